"""Fréchet distance between Gaussian fits of two feature sets, in float64 without scipy.

``FID = |μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})``: the trace of the matrix
square root is the sum of square roots of the eigenvalues of the symmetric PSD matrix
``Σ_a^{1/2} Σ_b Σ_a^{1/2}`` (the same as those of Σ_a Σ_b), so two ``eigh`` calls suffice.
"""
from __future__ import annotations

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of features (N, D)."""
    f = features.detach().to(torch.float64).reshape(features.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError("need at least two samples for a covariance")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    mu_a, cov_a, mu_b, cov_b = (torch.as_tensor(v, dtype=torch.float64) for v in (mu_a, cov_a, mu_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt
    return float(value.clamp_min(0))


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))

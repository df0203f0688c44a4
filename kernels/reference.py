"""Pure-torch twins of the fused kernels: the readable definition of spec §3-§5.

Every fused kernel in this package must agree with the function of the same name here.
Per-sample scalars are tensors of shape (B,); arithmetic runs in float32 (float64 stays float64)
and results are cast back to the input dtype.
"""
from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, like: torch.Tensor, dtype) -> torch.Tensor:
    return v.to(dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _mean_per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).mean(dim=1)


def renoise(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau):
    """Noisy-sample matching (spec §4): the exact transition from the student's stage end s to τ.

    Returns ``(x_tau, log_w)``: ``x_tau`` has the input's shape and dtype, ``log_w`` is (B,) float32
    (float64 for float64 inputs).
    """
    dtype = _compute_dtype(x0)
    x0c, epsc, zc = x0.to(dtype), eps.to(dtype), z.to(dtype)
    a_s, s_s = _per_sample(alpha_s, x0, dtype), _per_sample(sigma_s, x0, dtype)
    a_t, s_t = _per_sample(alpha_tau, x0, dtype), _per_sample(sigma_tau, x0, dtype)
    ratio = a_t / a_s
    beta = torch.sqrt(s_t**2 - (ratio * s_s) ** 2)
    x_s = a_s * x0c + s_s * epsc
    x_tau = ratio * x_s + beta * zc
    eps_mix = (ratio * s_s * epsc + beta * zc) / s_t
    log_w = -0.5 * _mean_per_sample(eps_mix**2) + 0.5 * _mean_per_sample(zc**2)
    return x_tau.to(x0.dtype), log_w


def tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c=1e-3, normalize=True):
    """The score-difference loss of spec §5; differentiable w.r.t. ``x0`` only."""
    dtype = _compute_dtype(x0)
    x = x0.to(dtype)
    d_cfg = d_uncond.to(dtype) + cfg_scale * (d_cond.to(dtype) - d_uncond.to(dtype))
    target = (x + d_cfg - d_fake.to(dtype)).detach()
    if normalize:
        norm = _mean_per_sample((x - d_cfg).abs()).clamp_min(1e-6).detach()
    else:
        norm = torch.ones(x.shape[0], dtype=dtype, device=x.device)
    diff = x - target
    if huber_c is None:
        elem = diff**2
    else:
        elem = torch.sqrt(diff**2 + huber_c**2) - huber_c
    return (_mean_per_sample(elem) / norm).mean()


def importance_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Self-normalised weights from log density ratios: mean 1 over the batch.

    Normalising over the batch keeps the fake-score loss on the same scale whatever the spread of
    the ratios, which is what lets the same learning rate serve with and without IS.
    """
    return torch.softmax(log_w.float(), dim=0) * log_w.shape[0]


def fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap=5.0):
    """Weighted x0-MSE of the fake score (spec §3 step 2): ``mean_b[min(SNR,cap) w_b mean_d (D - x̂0)^2]``.

    ``log_w`` of zeros turns importance sampling off. Differentiable w.r.t. ``d_fake``.
    """
    dtype = _compute_dtype(d_fake)
    weight = snr_tau.to(dtype).clamp(max=snr_cap) * importance_weights(log_w).to(dtype)
    err = _mean_per_sample((d_fake.to(dtype) - x0_target.to(dtype).detach()) ** 2)
    return (weight * err).mean()


def ddim_jump(x0, eps, alpha_next, sigma_next):
    """The deterministic DDIM jump ``α_next x̂0 + σ_next ε̂`` of the rollout and the sampler."""
    dtype = _compute_dtype(x0)
    a, s = _per_sample(alpha_next, x0, dtype), _per_sample(sigma_next, x0, dtype)
    return (a * x0.to(dtype) + s * eps.to(dtype)).to(x0.dtype)

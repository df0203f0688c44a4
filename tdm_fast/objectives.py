"""The Fisher-divergence generator objective (``objective="fisher"``, seed Table 8).

The derivation, and what in it is assumed rather than derived, is in docs/fisher.md. In short: the
Fisher divergence between the student's and the teacher's τ-marginals has, by the score-projection
identity, the unbiased gradient of

    ℓ = (D_cfg(x_τ) − x̂0)² − (D_f(x_τ) − x̂0)²      (SiD's loss at α = ½, times 2)

differentiated through x̂0 *and* through x_τ into the teacher and the fake score, with the networks'
weights held fixed. Unlike the KL loss of ``tdm_fast.kernels`` it needs the Jacobians of both
networks, so it is plain torch on top of their autograd graphs: the backward through the networks
is the cost (docs/fisher.md has the numbers), the elementwise loss is not worth a fused kernel.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .kernels.reference import _compute_dtype, _mean_per_sample, _per_sample


def fisher_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, normalize=True):
    """``mean_b mean_d [(D_cfg − x̂0)² − (D_f − x̂0)²] / n_b`` with ``D_cfg = D_u + w (D_c − D_u)``.

    ``n_b = max(mean_d |x̂0 − D_cfg|, 1e-6)`` (detached; 1 if ``normalize`` is False) is the KL loss's
    normaliser. Differentiable w.r.t. ``x0`` and, through whatever graph made them, the three
    predictions. Float32 arithmetic (float64 stays float64).
    """
    dtype = _compute_dtype(x0)
    x, f = x0.to(dtype), d_fake.to(dtype)
    d_cfg = d_uncond.to(dtype) + cfg_scale * (d_cond.to(dtype) - d_uncond.to(dtype))
    if normalize:
        norm = _mean_per_sample((x - d_cfg).abs()).clamp_min(1e-6).detach()
    else:
        norm = torch.ones(x.shape[0], dtype=dtype, device=x.device)
    # the factored difference of squares: near convergence D_cfg ≈ D_f while both errors stay large,
    # and subtracting the two squares would cancel most of the digits
    elem = (d_cfg - f) * (d_cfg + f - 2.0 * x)
    return (_mean_per_sample(elem) / norm).mean()


def with_x0_path(x_tau, x0, alpha_tau):
    """``x_tau`` (same values) with the gradient ``∂x_τ/∂x̂0 = α_τ``: the noise part σ_τ ε_mix is held
    fixed, as the KL objective holds it (its gradient reaches the student through x̂0 only)."""
    return x_tau.detach() + _per_sample(alpha_tau, x0, x_tau.dtype) * (x0 - x0.detach()).to(x_tau.dtype)


@contextmanager
def frozen(module: torch.nn.Module):
    """``module``'s trainable parameters stop requiring grad for the block, then are restored.

    The Fisher loss differentiates the fake score w.r.t. its input only. Left trainable, the fake's
    weights (its LoRA adapter, with LoRA roles) would collect gradients from the generator loss that
    its own next optimizer step would add to the fake-score loss's.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)

"""The public TDM ops: validate, pick a backend, run (see the package docstring)."""
from __future__ import annotations

import torch

from . import _backend, _ops, _validate, reference  # noqa: F401  (_ops registers torch.ops.tdm_fast.*)
from . import fake_score_loss as _fake_score_loss
from . import generator_loss as _generator_loss
from ._backend import BACKENDS
from .reference import importance_weights


def select_backend(x: torch.Tensor, op: str | None = None) -> str:
    """The backend a call of ``op`` (a public op's name) with ``x`` as its leading tensor would use:
    'triton', 'compile' or 'torch'."""
    return _backend.select(x, op)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _select(x: torch.Tensor, op: str) -> str:
    """The backend in eager mode; "" under torch.compile, where the custom operator picks at run time
    (the choice reads the environment and probes compilers, which Dynamo does not trace)."""
    return "" if torch.compiler.is_compiling() else _backend.select(x, op)


def tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c=1e-3, normalize=True):
    """The TDM generator loss (spec §5); a scalar differentiable w.r.t. ``x0`` only.

    ``huber_c=None`` uses the MSE instead of the pseudo-Huber distance; ``normalize=False`` drops the
    per-sample normaliser ``n_b``.
    """
    cfg_scale, huber_c = _validate.generator_loss_args(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    backend = _select(x0, "tdm_generator_loss")
    if backend == "torch":
        return reference.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    return _generator_loss.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize, backend)


def renoise(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau):
    """Noisy-sample matching (spec §4): ``(x_tau, log_w)``; scalars are (B,) tensors."""
    scalars = _validate.renoise_args(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau)
    backend = _select(x0, "renoise")
    if backend == "torch" or _needs_grad(x0, eps, z, *scalars):
        _validate.raise_if_bad_transition(*_validate.transition_ok(*scalars))
        return reference.renoise(x0, eps, z, *scalars)
    return torch.ops.tdm_fast.renoise(x0, eps, z, *scalars, backend)


def fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap=5.0):
    """Weighted x0-MSE of the fake score (spec §3 step 2); differentiable w.r.t. ``d_fake``."""
    snr_tau, log_w, snr_cap = _validate.fake_score_loss_args(d_fake, x0_target, snr_tau, log_w, snr_cap)
    backend = _select(d_fake, "fake_score_loss")
    if backend == "torch":
        return reference.fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap)
    return _fake_score_loss.fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap, backend)


def ddim_jump(x0, eps, alpha_next, sigma_next):
    """The deterministic DDIM jump ``α_next x̂0 + σ_next ε̂``; scalars are (B,) tensors."""
    alpha_next, sigma_next = _validate.ddim_jump_args(x0, eps, alpha_next, sigma_next)
    backend = _select(x0, "ddim_jump")
    if backend == "torch" or _needs_grad(x0, eps, alpha_next, sigma_next):
        return reference.ddim_jump(x0, eps, alpha_next, sigma_next)
    return torch.ops.tdm_fast.ddim_jump(x0, eps, alpha_next, sigma_next, backend)


__all__ = [
    "BACKENDS",
    "ddim_jump",
    "fake_score_loss",
    "importance_weights",
    "reference",
    "renoise",
    "select_backend",
    "tdm_generator_loss",
]

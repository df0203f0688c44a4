"""Argument checks shared by every backend, so that a bad call fails the same way everywhere."""
from __future__ import annotations

import math
import numbers

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def batch(name: str, t) -> torch.Tensor:
    """The leading tensor of an op: (B, ...) with B >= 1 and a non-empty sample."""
    tensor(name, t)
    if t.dim() < 1 or t.shape[0] < 1 or t.numel() == 0:
        raise ValueError(f"{name} must have shape (B, ...) with B >= 1 and non-empty samples, got {tuple(t.shape)}")
    return t


def like(name: str, t, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def per_sample(name: str, v, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar as a (B,) tensor; a Python number or a 1-element tensor broadcasts."""
    batch_size = ref.shape[0]
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a tensor of shape ({batch_size},) or a real number, got {type(v).__name__}")
    if not isinstance(v, torch.Tensor):
        return torch.full((batch_size,), float(v), dtype=torch.float32, device=ref.device)
    tensor(name, v)
    if v.device != ref.device:
        raise ValueError(f"{name} is on {v.device} but {ref_name} is on {ref.device}")
    if v.dim() > 1 or v.numel() not in (1, batch_size):
        raise ValueError(
            f"{name} must have shape ({batch_size},) to match {ref_name}'s batch, got {tuple(v.shape)}"
        )
    return v if v.dim() == 1 and v.numel() == batch_size else v.reshape(1).expand(batch_size)


def real(name: str, v, *, positive: bool = False) -> float:
    """A Python float from a number or a 1-element tensor; NaN and infinities are refused."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(v.shape)}")
        if not (v.dtype.is_floating_point or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real number, got a {v.dtype} tensor")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def generator_loss_args(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize):
    batch("x0", x0)
    for name, t in (("d_cond", d_cond), ("d_uncond", d_uncond), ("d_fake", d_fake)):
        like(name, t, "x0", x0)
    cfg_scale = real("cfg_scale", cfg_scale)
    huber_c = None if huber_c is None else real("huber_c", huber_c, positive=True)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return cfg_scale, huber_c


def renoise_args(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau):
    """The four per-sample scalars as (B,) tensors; ``transition_ok`` checks their values."""
    batch("x0", x0)
    like("eps", eps, "x0", x0)
    like("z", z, "x0", x0)
    return tuple(
        per_sample(name, v, "x0", x0)
        for name, v in (("alpha_s", alpha_s), ("sigma_s", sigma_s), ("alpha_tau", alpha_tau), ("sigma_tau", sigma_tau))
    )


def transition_ok(alpha_s, sigma_s, alpha_tau, sigma_tau):
    """(all valid, any α_s zero) as 0-dim bool tensors, from float64 copies.

    σ_τ² > (α_τ σ_s / α_s)², multiplied through by α_s² so that α_s = 0 fails it instead of dividing
    by zero; in float64 so that a float32 margin of one ulp is still seen. A violation would
    otherwise surface as NaNs deep in a training run. Traceable, so the compiled CPU path evaluates
    it inside its one compiled call.
    """
    a_s, s_s, a_t, s_t = (v.double() for v in (alpha_s, sigma_s, alpha_tau, sigma_tau))
    return ((s_t * a_s) ** 2 > (a_t * s_s) ** 2).all(), (a_s == 0).any()


def raise_if_bad_transition(ok, alpha_s_zero) -> None:
    """The transition's ValueError from ``transition_ok``'s flags. On an accelerator a device-side
    assertion (the host does not wait for the device in a training step); on the CPU it raises at once."""
    try:
        torch._assert_async(torch.as_tensor(ok), "renoise: need alpha_s != 0 and sigma_tau^2 > (alpha_tau*sigma_s/alpha_s)^2")
    except RuntimeError:
        if bool(alpha_s_zero):
            raise ValueError("alpha_s must be non-zero") from None
        raise ValueError(
            "sigma_tau is too small for the transition from s to tau: need sigma_tau^2 > (alpha_tau*sigma_s/alpha_s)^2"
        ) from None


def fake_score_loss_args(d_fake, x0_target, snr_tau, log_w, snr_cap):
    batch("d_fake", d_fake)
    like("x0_target", x0_target, "d_fake", d_fake)
    snr_tau = per_sample("snr_tau", snr_tau, "d_fake", d_fake)
    log_w = per_sample("log_w", log_w, "d_fake", d_fake)
    snr_cap = real("snr_cap", snr_cap, positive=True)
    return snr_tau, log_w, snr_cap


def ddim_jump_args(x0, eps, alpha_next, sigma_next):
    batch("x0", x0)
    like("eps", eps, "x0", x0)
    return per_sample("alpha_next", alpha_next, "x0", x0), per_sample("sigma_next", sigma_next, "x0", x0)

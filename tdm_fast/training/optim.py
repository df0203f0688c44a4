"""Optimisers, the learning-rate schedule and the EMA of the student's weights."""
from __future__ import annotations

import math

import torch

from .. import fsdp
from ..config import TDMConfig
from ..denoiser import Denoiser


class LRSchedule:
    """Linear warm-up, then constant or a cosine decay to ``floor`` × the base rate at ``total`` iterations
    (a class, so its state checkpoints as plain data)."""

    def __init__(self, warmup: int, decay: str = "constant", total: int = 1, floor: float = 0.0):
        self.warmup, self.decay, self.total, self.floor = warmup, decay, total, floor

    @classmethod
    def of(cls, config: TDMConfig) -> "LRSchedule":
        return cls(config.warmup_steps, config.lr_decay, config.iterations, config.lr_decay_floor)

    def __call__(self, step: int) -> float:
        scale = 1.0 if self.warmup <= 0 else min(1.0, (step + 1) / self.warmup)
        if self.decay == "cosine":
            progress = min(1.0, max(0, step - self.warmup) / max(1, self.total - self.warmup))
            scale *= self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return scale


class EMA:
    """Exponential moving average of the student's trainable weights, kept in float32."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """``skipped`` (a 0-d device tensor, 1 = the optimizer step was skipped) holds the average still
        without the host having to read it."""
        weight = 1.0 - self.decay if skipped is None else (1.0 - skipped) * (1.0 - self.decay)
        for s, p in zip(self.shadow, self.params):
            fsdp.local(s).lerp_(fsdp.local(p.detach()).float(), weight)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            fsdp.local(p).copy_(fsdp.local(s).to(p.dtype))


def skips_on_device(optimizer) -> bool:
    """Fused Adam/AdamW skip a step on the device when handed a ``found_inf`` flag (as the grad scaler
    does), so a non-finite update is refused without the host waiting for the device."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))


def make_optimizer(optimizer_cls, groups: list[dict], device: torch.device, **kwargs):
    """``optimizer_cls(groups, **kwargs)``, fused where it is torch's Adam/AdamW on a device with fused kernels."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if optimizer_cls in (torch.optim.Adam, torch.optim.AdamW) and device.type in _get_fused_kernels_supported_devices():
        kwargs.setdefault("fused", True)
    return optimizer_cls(groups, **kwargs)


def param_groups(denoiser: Denoiser, lr: float, steps_lr_ratio: float) -> list[dict]:
    """The trainable parameters, with the K embedding (if any) in its own group at ``lr * steps_lr_ratio``."""
    steps = [p for n, p in denoiser.named_parameters() if p.requires_grad and n.startswith("steps_embedding.")]
    rest = [p for n, p in denoiser.named_parameters() if p.requires_grad and not n.startswith("steps_embedding.")]
    return [{"params": rest}] + ([{"params": steps, "lr": lr * steps_lr_ratio}] if steps else [])


def optimizer_and_schedule(optimizer_cls, denoiser: Denoiser, lr: float, config: TDMConfig, device: torch.device):
    """The optimizer of ``denoiser``'s trainable weights at ``lr`` and its LR schedule. The schedule stays
    outside accelerate's ``prepare()``: accelerate steps a prepared scheduler once per process per call, so
    N processes would warm up N times faster than one."""
    optimizer = make_optimizer(optimizer_cls, param_groups(denoiser, lr, config.steps_embedding_lr_ratio), device, lr=lr,
                               betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.of(config))

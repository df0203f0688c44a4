"""Conditions are tensors with a leading batch dimension, or dicts of them (SDXL's added conditions).

The unconditional condition ``∅`` is stored for one sample (no batch dimension; a Python int for
class labels) and expanded to a batch when CFG needs it.
"""
from __future__ import annotations

import torch


def batch_size(cond) -> int:
    if isinstance(cond, dict):
        return batch_size(next(iter(cond.values())))
    return int(cond.shape[0])


def expand_null(null_cond, batch: int, like=None):
    """Repeat the one-sample unconditional condition ``batch`` times, on ``like``'s device and dtype."""
    if isinstance(null_cond, dict):
        return {k: expand_null(v, batch, None if like is None else like[k]) for k, v in null_cond.items()}
    if isinstance(null_cond, int):
        device = None if like is None else like.device
        return torch.full((batch,), null_cond, dtype=torch.long, device=device)
    null_cond = torch.as_tensor(null_cond)
    if like is not None:
        null_cond = null_cond.to(device=like.device, dtype=like.dtype)
    return null_cond.unsqueeze(0).expand(batch, *null_cond.shape)


def concat(a, b):
    if isinstance(a, dict):
        return {k: concat(a[k], b[k]) for k in a}
    return torch.cat([a, b], dim=0)


def select(cond, index: torch.Tensor):
    if isinstance(cond, dict):
        return {k: select(v, index) for k, v in cond.items()}
    return cond[index]


def to_device(cond, device):
    if isinstance(cond, dict):
        return {k: to_device(v, device) for k, v in cond.items()}
    return cond.to(device)

"""``UNet2DConditionModel`` (SD1.5 and SD2 ε/v-prediction, SDXL) as a ``model(x_t, t, cond)``."""
from __future__ import annotations

import torch

from .base import DiffusersAdapter


class UNetAdapter(DiffusersAdapter):
    """``cond`` is the text embedding (B, L, C), or for SDXL a dict with ``encoder_hidden_states``,
    ``text_embeds`` (pooled) and ``time_ids``."""

    time_embedding_module = "inner.time_embedding"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.inner.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.inner.config.in_channels, *size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if isinstance(cond, dict):
            added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
            return self.inner(
                x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added or None
            ).sample
        return self.inner(x_t, t, encoder_hidden_states=cond).sample

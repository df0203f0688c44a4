"""``PixArtTransformer2DModel`` (PixArt-α, ε-prediction with learned σ) as a ``model(x_t, t, cond)``."""
from __future__ import annotations

import torch

from .base import DiffusersAdapter


class PixArtAdapter(DiffusersAdapter):
    """``cond`` is a dict with ``encoder_hidden_states`` (B, L, C) (T5) and optionally
    ``encoder_attention_mask`` (B, L).

    The learned-σ output (2·C channels) is cut to its first C channels (the ε-prediction), as
    ``PixArtAlphaPipeline`` does. Resolution conditioning follows the pipeline: for the 1024 model
    (``sample_size == 128``) ``resolution`` is the pixel (height, width) = latent size × ``vae_scale_factor``
    and ``aspect_ratio`` = height / width; otherwise both are None.
    """

    time_embedding_module = "inner.adaln_single.emb.timestep_embedder"

    def __init__(self, inner, vae_scale_factor: int = 8):
        super().__init__(inner)
        self.vae_scale_factor = int(vae_scale_factor)

    def adapter_kwargs(self) -> dict:
        return {"vae_scale_factor": self.vae_scale_factor}

    def added_cond_kwargs(self, x_t: torch.Tensor, dtype) -> dict:
        if self.inner.config.sample_size != 128:
            return {"resolution": None, "aspect_ratio": None}
        b, _, h, w = x_t.shape
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        resolution = torch.tensor([height, width]).repeat(b, 1).to(dtype=dtype, device=x_t.device)
        aspect_ratio = torch.tensor([float(height / width)]).repeat(b, 1).to(dtype=dtype, device=x_t.device)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if not isinstance(cond, dict):
            cond = {"encoder_hidden_states": cond}
        states = cond["encoder_hidden_states"]
        out = self.inner(
            x_t,
            encoder_hidden_states=states,
            encoder_attention_mask=cond.get("encoder_attention_mask"),
            timestep=t,
            added_cond_kwargs=self.added_cond_kwargs(x_t, states.dtype),
            return_dict=False,
        )[0]
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        return out

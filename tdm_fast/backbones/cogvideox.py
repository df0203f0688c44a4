"""``CogVideoXTransformer3DModel`` (CogVideoX, v-prediction, video latents (B, F, C, H, W))."""
from __future__ import annotations

import torch

from .base import DiffusersAdapter


class CogVideoXAdapter(DiffusersAdapter):
    """``cond`` is the T5 embedding (B, 226, 4096), or a dict with ``encoder_hidden_states``.

    Rotary position embeddings (CogVideoX-5B and 1.5) are computed from the latent shape as
    ``CogVideoXPipeline`` does.
    """

    time_embedding_module = "inner.time_embedding"

    def __init__(self, inner, vae_scale_factor_spatial: int = 8):
        super().__init__(inner)
        self.vae_scale_factor_spatial = int(vae_scale_factor_spatial)

    def adapter_kwargs(self) -> dict:
        return {"vae_scale_factor_spatial": self.vae_scale_factor_spatial}

    def check_traceable(self, x_t_shape: tuple[int, ...]) -> None:
        """Raise unless ``torch.export`` (ONNX export) can trace a call on latents of ``x_t_shape``.

        With sin-cos position embeddings (CogVideoX-2B) that is the native latent size only: at any
        other size diffusers rebuilds the position table with numpy during the call, which the tracer
        cannot capture.
        """
        config = self.inner.config
        if config.use_rotary_positional_embeddings:
            return
        native = ((config.sample_frames - 1) // config.temporal_compression_ratio + 1, config.sample_height, config.sample_width)
        got = (x_t_shape[1], x_t_shape[3], x_t_shape[4])
        if got != native:
            raise ValueError(
                f"this CogVideoX model exports at its native latent (frames, height, width) = {native} only, got {got}: "
                "at other sizes diffusers rebuilds its sin-cos position table with numpy during the call, which "
                "torch.export cannot trace"
            )

    def rotary_embedding(self, x_t: torch.Tensor):
        config = self.inner.config
        if not config.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        num_frames, h, w = x_t.shape[1], x_t.shape[3], x_t.shape[4]
        p, p_t = config.patch_size, config.patch_size_t
        grid_h, grid_w = h // p, w // p
        base_w, base_h = config.sample_width // p, config.sample_height // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                temporal_size=num_frames, device=x_t.device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
            temporal_size=(num_frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=x_t.device,
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        states = cond["encoder_hidden_states"] if isinstance(cond, dict) else cond
        return self.inner(
            hidden_states=x_t,
            encoder_hidden_states=states,
            timestep=t,
            image_rotary_emb=self.rotary_embedding(x_t),
            return_dict=False,
        )[0]

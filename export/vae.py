"""The VAE decoder as its own graph: latents from the sampler graph in, images in [0, 1] out.

Kept apart from the sampler graph so that one decoder serves every K, and so that a deployment can
decode in another precision or on another device than it samples. The latent un-scaling of the
diffusers pipelines is baked in: ``z = latents · std / scaling_factor + mean`` when the VAE's config
has ``latents_mean``/``latents_std`` (SDXL-style), else ``z = latents / scaling_factor + shift_factor``
(SD3 and Flux set a shift); the output is ``(decode(z) / 2 + 0.5).clamp(0, 1)``, what
``VaeImageProcessor.postprocess(..., output_type="pt")`` returns.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .onnx import DEFAULT_OPSET, _io_meta, _run_exporter, _set_metadata, _version, dtype_name, resolve_dtype


class LatentDecoder(nn.Module):
    """``forward(latents) -> images``: a diffusers ``AutoencoderKL``-style VAE's ``decode`` with the
    pipeline's latent un-scaling before it and its image post-processing after it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        config = vae.config
        if not hasattr(vae, "decode") or getattr(config, "scaling_factor", None) is None:
            raise TypeError(f"{type(vae).__name__} is not a diffusers VAE with decode() and config.scaling_factor")
        self.vae = vae
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.latent_channels = int(config.latent_channels)
        self.upscale = 2 ** (len(config.block_out_channels) - 1)
        shape = (1, self.latent_channels, 1, 1)
        if mean is not None and std is not None:
            scale = torch.tensor(std, dtype=torch.float32).view(shape) / self.scaling_factor
            offset = torch.tensor(mean, dtype=torch.float32).view(shape)
        else:
            scale = torch.full(shape, 1.0 / self.scaling_factor)
            offset = torch.full(shape, self.shift_factor)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("offset", offset, persistent=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        z = latents * self.scale.to(latents.dtype) + self.offset.to(latents.dtype)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


def load_vae(path: str | Path, variant: str | None = None) -> nn.Module:
    """A diffusers VAE from its folder or from a pipeline folder holding ``vae/``; the class is the
    one its ``config.json`` names (``AutoencoderKL`` and its relatives). ``variant``: its weight variant
    (``fp16`` loads ``diffusion_pytorch_model.fp16.safetensors``)."""
    import diffusers

    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no VAE at {path}: expected config.json there or in its vae/ subfolder")
    name = json.loads(config.read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "decode"):
        raise ValueError(f"{config} names {name!r}, which is not a diffusers VAE class")
    return cls.from_pretrained(path, **({"variant": variant} if variant else {})).eval()


def export_vae_decoder_onnx(
    vae: nn.Module,
    path: str | Path,
    latents: torch.Tensor | tuple[int, ...],
    dtype="fp32",
    dynamic_batch: bool = True,
    dynamic_resolution: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
) -> dict:
    """Export :class:`LatentDecoder` of ``vae`` as one ONNX graph ``latents -> images``; returns its metadata.

    Args:
        latents: an example latent batch, or one latent's shape (C, h, w).
        dtype: ``fp32`` or ``fp16`` weights and input (the images come out in float32). The SD1.5
            and SDXL VAEs overflow in fp16; use an fp16-fixed VAE or keep fp32.
        dynamic_resolution: latent height and width are symbolic (``height``/``width``), for
            TensorRT profiles over resolutions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype)
    decoder = LatentDecoder(copy.deepcopy(vae)).eval().requires_grad_(False)
    device = next(decoder.parameters()).device
    decoder.to(dtype=dtype)
    if not isinstance(latents, torch.Tensor):
        latents = torch.randn(2, *latents)
    if latents.shape[0] == 1 and dynamic_batch:  # a batch of 1 would be specialised by the tracer
        latents = torch.cat([latents, latents])
    latents = latents.to(device=device, dtype=dtype)
    axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_resolution:
        axes.update({2: "height", 3: "width"})
    _run_exporter(decoder, (latents,), path, ("latents",), ("images",), [axes], opset, exporter)
    b, _, h, w = latents.shape
    image_shape = [axes.get(0, b), int(getattr(vae.config, "out_channels", 3)), f"{decoder.upscale}*height" if dynamic_resolution else h * decoder.upscale,
                   f"{decoder.upscale}*width" if dynamic_resolution else w * decoder.upscale]
    meta = {
        "graph": "vae_decoder",
        "backbone": type(vae).__name__,
        "dtype": dtype_name(dtype),
        "inputs": _io_meta(("latents",), (latents,), [axes]),
        "outputs": [{"name": "images", "shape": image_shape, "dtype": "float32", "range": [0, 1]}],
        "scaling_factor": decoder.scaling_factor,
        "shift_factor": decoder.shift_factor,
        "latents_mean": getattr(vae.config, "latents_mean", None),
        "latents_std": getattr(vae.config, "latents_std", None),
        "upscale": decoder.upscale,
        "opset": opset,
        "exporter": exporter,
        "tdm_fast_version": _version(),
        "torch_version": torch.__version__,
    }
    return _set_metadata(path, meta)

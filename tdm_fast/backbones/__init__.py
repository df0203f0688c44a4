"""Real diffusers backbones: adapters to the teacher protocol, presets, LoRA and export helpers."""
from .base import DiffusersAdapter
from .cogvideox import CogVideoXAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter

__all__ = ["DiffusersAdapter", "UNetAdapter", "PixArtAdapter", "SD3Adapter", "CogVideoXAdapter"]

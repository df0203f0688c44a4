"""The built-in digits-scale teachers: the shipped ``digits`` UNet and two that differ from it in
architecture, size, parameterisation and noise schedule, so that a recipe is never judged on one network.

| name | network | parameters | prediction | schedule |
|---|---|---|---|---|
| ``digits`` | :class:`~tdm_fast.demos.digits.DigitsUNet` (32, 64) | 0.44 M | ε | scaled-linear VP |
| ``digits-small-v`` | :class:`~tdm_fast.demos.digits.DigitsUNet` (24, 48) | 0.25 M | v | linear VP (β 1e-4 → 0.02) |
| ``digits-dit`` | :class:`DigitsDiT` (patch 2, width 96, depth 4) | 0.56 M | flow velocity | rectified flow, shift 2 |

All three are class-conditional on scikit-learn's 8×8 digits with a null class for CFG, trained by
:func:`tdm_fast.demos.digits.train_digits_teacher` and shipped flat in ``tdm_fast/assets`` (``tdm-fast teacher
train --dataset digits --architecture NAME`` rebuilds one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from ..atomic import atomic_folder
from ..denoiser import Denoiser
from .digits import ASSETS, DIGITS_CFG_SCALE, DIGITS_SCHEDULE, IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, DigitsUNet, \
    load_digits_teacher, timestep_features
from ..schedule import ScheduleConfig


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, both modulated by the condition embedding (adaLN-zero: starts as identity)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(emb)[:, None].chunk(6, dim=-1)
        x = self.norm1(h) * (1 + scale1) + shift1
        h = h + gate1 * self.attn(x, x, x, need_weights=False)[0]
        x = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * self.mlp(x)


class DigitsDiT(ModelMixin, ConfigMixin):
    """A class-conditional diffusion transformer on 8×8 digits: 2×2 patches → 16 tokens, adaLN-zero blocks.

    ``model(x_t, t, labels)``; label ``num_classes`` is the null class; ``time_embed`` is where a
    steps-aware student adds its embedding of K.
    """

    time_embedding_module = "time_embed"

    @register_to_config
    def __init__(self, in_channels: int = 1, patch_size: int = 2, width: int = 96, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0, num_classes: int = NUM_CLASSES, sample_size: int = IMAGE_SIZE):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        tokens = (sample_size // patch_size) ** 2
        self.patchify = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embed = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation_out = nn.Linear(width, 2 * width)
        self.proj_out = nn.Linear(width, patch_size * patch_size * in_channels)
        for layer in (self.modulation_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, c, size, _ = x_t.shape
        p, width = self.config.patch_size, self.config.width
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)
        emb = F.silu(self.time_embed(timestep_features(t, width).to(x_t.dtype)) + self.class_embed(labels.long()))
        h = self.patchify(x_t).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.modulation_out(emb)[:, None].chunk(2, dim=-1)
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        n = size // p
        return h.reshape(b, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, size, size)


MODEL_CLASSES = {"DigitsUNet": DigitsUNet, "DigitsDiT": DigitsDiT}


@dataclass(frozen=True)
class BuiltinTeacher:
    """How one built-in teacher is built, trained and distilled."""

    name: str
    description: str
    model_class: str
    model_config: dict
    prediction_type: str
    schedule: ScheduleConfig
    training: dict = field(default_factory=dict)  # train_digits_teacher keyword arguments
    cfg_scale: float = DIGITS_CFG_SCALE

    def fresh(self) -> Denoiser:
        torch.manual_seed(self.training.get("seed", 0))
        model = MODEL_CLASSES[self.model_class](**self.model_config)
        return Denoiser(model, self.schedule, self.prediction_type, null_cond=NULL_CLASS)

    @property
    def asset(self) -> Path:
        return ASSETS / f"{self.name.replace('-', '_')}_teacher"

    def missing_files(self) -> list[Path]:
        """The asset's files (weights, metadata) that are not there: the teacher is not built."""
        return [f for f in (self.asset.with_suffix(".safetensors"), self.asset.with_suffix(".json")) if not f.is_file()]


TEACHERS = {
    "digits": BuiltinTeacher("digits", "the shipped digits UNet (ε, scaled-linear)", "DigitsUNet",
                             {"channels": (32, 64), "emb_dim": 128}, "epsilon", DIGITS_SCHEDULE),
    "digits-small-v": BuiltinTeacher(
        "digits-small-v", "a smaller digits UNet predicting v under the linear schedule", "DigitsUNet",
        {"channels": (24, 48), "emb_dim": 96}, "v_prediction",
        ScheduleConfig(kind="vp", beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        training={"iterations": 2000, "lr": 2e-3, "seed": 1}),
    "digits-dit": BuiltinTeacher(
        "digits-dit", "a diffusion transformer trained by flow matching (shift 2)", "DigitsDiT",
        {"width": 96, "depth": 4, "heads": 4}, "flow", ScheduleConfig(kind="flow", shift=2.0),
        training={"iterations": 2000, "lr": 1e-3, "seed": 2}),
}


def load_builtin_teacher(name: str) -> Denoiser:
    """A built-in teacher by name (frozen, eval mode); see :data:`TEACHERS`."""
    if name not in TEACHERS:
        raise ValueError(f"unknown built-in teacher {name!r}; choose from {', '.join(TEACHERS)}")
    if name == "digits":
        return load_digits_teacher()
    spec = TEACHERS[name]
    from safetensors.torch import load_file

    if spec.missing_files():
        raise FileNotFoundError(f"the {name} teacher is not built; build it with "
                                f"`tdm-fast teacher train --dataset digits --architecture {name}`")
    meta = json.loads(spec.asset.with_suffix(".json").read_text())
    teacher = spec.fresh()
    teacher.model.load_state_dict(load_file(str(spec.asset.with_suffix(".safetensors"))))
    teacher.training_info = meta.get("training")
    return teacher.eval().requires_grad_(False)


def train_builtin_teacher(name: str, output_dir: str | Path | None = None, progress: bool = True, **overrides) -> Denoiser:
    """Trains a built-in teacher from scratch with its recorded settings (``overrides`` change them)."""
    from .digits import save_teacher_asset, train_digits_teacher

    spec = TEACHERS[name]
    settings = {**spec.training, **overrides}
    teacher = train_digits_teacher(None, init=spec.fresh(), fresh=True, progress=progress, **settings)
    if output_dir is not None:
        with atomic_folder(output_dir) as folder:
            teacher.save_pretrained(folder)
            save_teacher_asset(teacher, folder / spec.asset.name, teacher.training_info)
    return teacher

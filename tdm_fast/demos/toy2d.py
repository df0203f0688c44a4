"""The built-in 2-D teacher: a class-conditional mixture of Gaussians where CFG matters.

Eight modes on a circle; class c owns the modes of its parity and puts 75 % of its mass there,
25 % on the other class's modes. Without CFG a sampler lands on a wrong-class mode a quarter of
the time; CFG pushes samples onto their own modes, which is what the student must learn to do in
a few steps.
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from tqdm.auto import tqdm

from ..denoiser import Denoiser, denoising_loss
from ..schedule import ScheduleConfig

NUM_MODES = 8
NUM_CLASSES = 2
RADIUS = 2.0
MODE_STD = 0.12
OWN_MASS = 0.75
TOY_SCHEDULE = ScheduleConfig(kind="vp", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def mode_centers() -> torch.Tensor:
    angles = torch.arange(NUM_MODES, dtype=torch.float32) * (2 * math.pi / NUM_MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def mode_owner() -> torch.Tensor:
    """Class that owns each mode (its parity)."""
    return torch.arange(NUM_MODES) % NUM_CLASSES


def sample_data(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw points of the given classes from the mixture."""
    n = labels.shape[0]
    own = torch.rand(n, generator=generator) < OWN_MASS
    parity = torch.where(own, labels, 1 - labels)
    mode = parity + NUM_CLASSES * torch.randint(0, NUM_MODES // NUM_CLASSES, (n,), generator=generator)
    return mode_centers()[mode] + MODE_STD * torch.randn(n, 2, generator=generator)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ToyMLP(ModelMixin, ConfigMixin):
    """An ε-predicting MLP: ``model(x_t, t, labels)``; label ``num_classes`` is the null class."""

    time_embedding_module = "time_embed"

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 128, depth: int = 3, data_dim: int = 2):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, data_dim))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.config.data_dim,)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_features(t, self.config.hidden).to(x_t.dtype)) + self.class_embed(labels)
        h = self.inp(x_t) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


def toy_denoiser(model: ToyMLP | None = None) -> Denoiser:
    model = model or ToyMLP()
    return Denoiser(model, TOY_SCHEDULE, "epsilon", null_cond=model.config.num_classes)


def train_toy_teacher(
    iterations: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    cond_dropout: float = 0.15,
    seed: int = 0,
    hidden: int = 128,
    progress: bool = True,
) -> Denoiser:
    """Trains the ε-prediction teacher by denoising score matching with class dropout (for CFG)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    teacher = toy_denoiser(ToyMLP(hidden=hidden))
    model = teacher.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    for _ in tqdm(range(iterations), desc="toy teacher", disable=not progress):
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        loss = denoising_loss(teacher, sample_data(labels, generator), labels, generator, cond_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_decay.step()
    model.eval().requires_grad_(False)
    return teacher


def classify_modes(points: torch.Tensor, max_dist: float = 4 * MODE_STD) -> torch.Tensor:
    """Index of the nearest mode, or -1 where a point lies off every mode."""
    dist = torch.cdist(points.float(), mode_centers())
    nearest = dist.argmin(dim=1)
    return torch.where(dist.gather(1, nearest[:, None]).squeeze(1) <= max_dist, nearest, torch.full_like(nearest, -1))

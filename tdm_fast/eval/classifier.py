"""The digits classifier: a small CNN whose penultimate features define our FID ("digits-FID").

Trained by :func:`train_digits_classifier` on the training split only (seeded); its accuracy is
measured on the held-out split that neither it nor the teacher saw. The weights ship in
``tdm_fast/assets/digits_classifier.safetensors`` with ``digits_classifier.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..demos.digits import ASSETS, NUM_CLASSES, augment, load_digits_tensors

CLASSIFIER_ASSET = "digits_classifier"


class DigitsClassifier(nn.Module):
    """conv(32) → conv(64) → pool → conv(64) → pool → linear(``feature_dim``) → linear(10)."""

    def __init__(self, feature_dim: int = 64, width: int = 32):
        super().__init__()
        self.config = {"feature_dim": feature_dim, "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.MaxPool2d(2),  # 2×2
            nn.Flatten(),
            nn.Linear(8 * width, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.dropout = nn.Dropout(0.2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim) of images in [-1, 1], shape (B, 1, 8, 8)."""
        return self.body(x.float().clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    # -- shipping --------------------------------------------------------------------------------
    def save(self, path: str | Path, info: dict | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps({"config": self.config, **(info or {})}, indent=2))

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DigitsClassifier":
        path = Path(path) if path is not None else ASSETS / CLASSIFIER_ASSET
        meta = json.loads(path.with_suffix(".json").read_text())
        model = cls(**meta["config"])
        model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
        model.info = meta
        return model.eval().requires_grad_(False)


_CACHE: dict = {}


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped classifier (cached per path)."""
    key = str(path)
    if key not in _CACHE:
        _CACHE[key] = DigitsClassifier.load(path)
    return _CACHE[key]


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    preds = torch.cat([model(images[i : i + batch]).argmax(-1) for i in range(0, images.shape[0], batch)])
    return float((preds == labels).float().mean())


def train_digits_classifier(
    output: str | Path | None = None,
    iterations: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DigitsClassifier, dict]:
    """Trains on the training split with ±1-pixel shifts and light pixel noise; returns (model, info).

    ``info`` carries the held-out accuracy. Saves ``output``.safetensors/.json when given.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensors("train")
    held_x, held_y = load_digits_tensors("heldout")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(iterations), desc="digits classifier", disable=not progress):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = augment(images[idx], g, max_shift=1)
        x = x + 0.1 * torch.rand(batch_size, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    info = {
        "heldout_accuracy": accuracy(model, held_x, held_y),
        "train_accuracy": accuracy(model, images, labels),
        "iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
        "wall_s": time.perf_counter() - start,
    }
    if output is not None:
        model.save(output, info)
    return model, info


def add_classifier_arguments(parser) -> None:
    """argparse options of ``tdm-fast classifier train`` (progress: the CLI's --quiet)."""
    from ..argtypes import positive_int
    from ..usage import add_once as _add

    _add(parser, "--out", default="runs/digits_classifier", help="path stem: writes STEM.safetensors and STEM.json")
    _add(parser, "--iterations", type=positive_int, default=None, help="default 1500 (the shipped classifier)")
    _add(parser, "--seed", type=int, default=0)


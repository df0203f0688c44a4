"""Validation during training: fixed conditions and noise, sampled at every K through the sampler users
will use, saved as an image grid (``<run>/validation/step-XXXXXXXX.png``), logged to the trackers, and
scored where the run has a metric.

The same noise and conditions at every validation step make the grids a film of the student's progress.
Samples are taken with the EMA weights where the run keeps them (what the saved student will hold).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .conditions import to_device
from .sampling import sample_student

Decode = Callable[[torch.Tensor], torch.Tensor]  # samples -> images (N, C, H, W) in [0, 1]
Metric = Callable[[int, torch.Tensor, object], dict]  # (K, decoded images, conditions) -> {name: value}


@dataclass
class Validation:
    """What to sample at each validation step.

    Args:
        conditions: one batch of conditions (labels, an embedding tensor or a dict of them).
        noise: the initial noise, (N, *sample_shape).
        decode: samples -> images in [0, 1] (e.g. a VAE decoder); default: samples in [-1, 1] are images.
        metric: optional score of the decoded images per K (e.g. a classifier's accuracy).
        captions: what each sample shows (its prompt), written on the grids.
    """

    conditions: object
    noise: torch.Tensor
    decode: Decode | None = None
    metric: Metric | None = None
    captions: list[str] | None = None

    @classmethod
    def from_conditions(cls, conditions, sample_shape, count: int = 16, seed: int = 0, **kwargs) -> "Validation":
        """``count`` draws of the run's own condition sampler and noise, from a fixed seed."""
        generator = torch.Generator().manual_seed(seed)
        cond = conditions(count, generator)
        noise = torch.randn((count, *sample_shape), generator=generator)
        return cls(cond, noise, **kwargs)

    @torch.no_grad()
    def run(self, student, steps, total_steps: int, solver: str = "ddim", device=None) -> tuple[dict[int, torch.Tensor], dict]:
        """Images of ``student`` per K of ``steps`` (N, C, H, W in [0, 1], or the raw samples for non-image
        data) and the metrics; the caller chooses the weights (the trainer swaps in its EMA) and autocast."""
        images, metrics = {}, {}
        cond = to_device(self.conditions, device) if device is not None else self.conditions
        noise = self.noise.to(device) if device is not None else self.noise
        for k in sorted(steps):
            x = sample_student(student, noise, cond, k, total_steps, solver=solver).float()
            decoded = self.decode(x) if self.decode is not None else ((x + 1) / 2).clamp(0, 1)
            images[k] = decoded.cpu()
            if self.metric is not None:
                metrics.update({f"validation/{name}_k{k}": float(v) for name, v in self.metric(k, decoded, self.conditions).items()})
        return images, metrics


def grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (H', W', 3) uint8 grid, one pixel of padding between images."""
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    elif c != 3:
        images = images[:, :3] if c > 3 else torch.cat([images, images[:, -1:].expand(n, 3 - c, h, w)], 1)
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = torch.ones(3, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    return (canvas.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def save_validation(images: dict[int, torch.Tensor], path: Path, step: int, captions: list[str] | None = None,
                    columns: int = 8) -> dict[int, np.ndarray]:
    """One PNG: a row block per K (image data), or one scatter panel per K (2-D points); returns the grids.
    ``captions``: each image is numbered in its cell and the numbers' prompts are listed under the grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    grids = {}
    fig, axes = plt.subplots(len(images), 1, figsize=(8, 2.2 * len(images)), squeeze=False)
    for ax, (k, x) in zip(axes[:, 0], sorted(images.items(), reverse=True)):
        if x.dim() == 4:
            grids[k] = grid(x, columns)
            ax.imshow(grids[k], interpolation="nearest")
            ax.axis("off")
            if captions:
                height, width = x.shape[-2:]
                for i in range(x.shape[0]):
                    row, col = divmod(i, min(columns, x.shape[0]))
                    ax.text(1 + col * (width + 1), 1 + row * (height + 1), str(i + 1), color="yellow", fontsize=7,
                            va="top", ha="left", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
        else:
            points = x.reshape(x.shape[0], -1)[:, :2] * 2 - 1  # back to the data's own scale
            ax.scatter(points[:, 0], points[:, 1], s=6)
            ax.set_aspect("equal")
        ax.set_title(f"K = {k}", fontsize=9)
    fig.suptitle(f"validation at step {step}", fontsize=10)
    if captions:
        fig.text(0.01, 0.0, "\n".join(f"{i + 1}: {c}" for i, c in enumerate(captions)), fontsize=7, va="bottom")
        fig.set_figheight(fig.get_figheight() + 0.15 * len(captions))
        fig.tight_layout(rect=(0, 0.15 * len(captions) / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return grids


def log_validation(accelerator, grids: dict[int, np.ndarray], metrics: dict, step: int) -> None:
    """Sends the grids and metrics to the run's trackers (tensorboard, wandb, … whichever are set)."""
    if metrics:
        accelerator.log(metrics, step=step)
    for tracker in accelerator.trackers:
        for k, image in grids.items():
            if tracker.name == "tensorboard":
                tracker.log_images({f"validation/K={k}": image[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({f"validation/K={k}": [image]}, step=step)

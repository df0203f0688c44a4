"""Pictures of samples: scatter plots for 2-D points, image grids for everything with pixels."""
from __future__ import annotations

from pathlib import Path

import torch


def save_samples_png(samples: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = samples.detach().float().cpu()
    if samples.dim() == 2 and samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(samples[:, 0], samples[:, 1], c=labels.cpu(), cmap="coolwarm", s=3)
        ax.set_aspect("equal")
    else:
        images = samples.reshape(samples.shape[0], -1, *samples.shape[-2:])[:, :3]
        cols = min(8, images.shape[0])
        rows = (images.shape[0] + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, ax in enumerate(axes.flat[: images.shape[0]]):
            img = ((images[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
            ax.imshow(img.squeeze(-1), cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_title(str(int(labels[i])), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

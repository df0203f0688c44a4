"""Validation during training: fixed conditions and noise, sampled at every K through the sampler users
will use, saved as an image grid (``<run>/validation/step-XXXXXXXX.png``), logged to the trackers, and
scored where the run has a metric.

The same noise and conditions at every validation step make the grids a film of the student's progress.
Samples are taken with the EMA weights where the run keeps them (what the saved student will hold).

Where the teacher is given, each K is also measured against what the teacher does without training
(spec §9): the mean squared distance of the student's samples to the teacher's 50-step CFG samples of the
same noise and conditions, over that of the best NFE-matched teacher sampler (``gap_k{K}`` < 1: the
student is ahead of every sampler of at most K evaluations). The teacher's side is computed once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .conditions import to_device
from .sampling import nfe_matched_baselines, reference_sampler, sample_student

REFERENCE_STEPS = 50
AHEAD = 0.99  # a gap under this is ahead of the baseline; within 1 % of it, level (an untrained K = 1 student is)
# A gap this many times a K's best earlier one in the run is reported as drift. The validation inputs are fixed, so
# the gap moves only with the student; sd15's 4-step gap rose 1.12x from 1,000 to 2,000 iterations (FID ratio 1.46x).
DRIFT = 1.1

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

    def __post_init__(self):
        self._teacher_side = {}  # (K set, total_steps, cfg_scale) -> (reference samples, {K: (sampler, distance)})
        self.last_baselines = {}  # K -> (the best NFE-matched sampler's name, its distance), of the last run

    @torch.no_grad()
    def run(self, student, steps, total_steps: int, solver: str = "ddim", device=None, teacher=None,
            cfg_scale: float = 1.0) -> tuple[dict[int, torch.Tensor], dict]:
        """Images of ``student`` per K of ``steps`` (N, C, H, W in [0, 1], or the raw samples for non-image
        data) and the metrics; the caller chooses the weights (the trainer swaps in its EMA) and autocast.
        With ``teacher``: also ``distance_k{K}``, ``baseline_distance_k{K}`` and ``gap_k{K}`` (module doc)."""
        images, metrics = {}, {}
        cond = to_device(self.conditions, device) if device is not None else self.conditions
        noise = self.noise.to(device) if device is not None else self.noise
        reference, baselines = self.teacher_side(teacher, noise, cond, steps, total_steps, cfg_scale) if teacher else (None, {})
        self.last_baselines = baselines
        for k in sorted(steps):
            x = sample_student(student, noise, cond, k, total_steps, solver=solver).float()
            decoded = self.decode(x) if self.decode is not None else ((x + 1) / 2).clamp(0, 1)
            images[k] = decoded.cpu()
            if self.metric is not None:
                metrics.update({f"validation/{name}_k{k}": float(v) for name, v in self.metric(k, decoded, self.conditions).items()})
            if reference is not None:
                distance = mean_squared_distance(x, reference)
                _, baseline = baselines[k]
                metrics.update({f"validation/distance_k{k}": distance, f"validation/baseline_distance_k{k}": baseline,
                                f"validation/gap_k{k}": distance / baseline if baseline > 0 else float("inf")})
        return images, metrics

    def teacher_side(self, teacher, noise, cond, steps, total_steps: int, cfg_scale: float):
        """The teacher's 50-step CFG samples of the validation inputs and, per K, the best NFE-matched
        sampler with its distance to them (computed on the first call, then kept)."""
        key = (tuple(sorted(steps)), total_steps, float(cfg_scale))
        if key not in self._teacher_side:
            num_t = teacher.schedule.num_train_timesteps
            reference = reference_sampler(REFERENCE_STEPS, cfg_scale, num_t)(teacher, noise, cond).float()
            best = {}
            for k in key[0]:
                scored = [(sampler.name, mean_squared_distance(sampler(teacher, noise, cond).float(), reference))
                          for sampler in nfe_matched_baselines(k, cfg_scale, total_steps, num_t)]
                best[k] = min(scored, key=lambda pair: pair[1])
            self._teacher_side[key] = (reference, best)
        return self._teacher_side[key]


def mean_squared_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the squared distance per element, between samples of the same inputs."""
    return float((samples.float() - reference.float()).pow(2).mean())


def gap_report(metrics: dict, steps, baselines: dict) -> list[str]:
    """One line per K of a validation's gap metrics, saying whether the student is ahead of its baseline."""
    lines = []
    for k in sorted(steps):
        gap = metrics.get(f"validation/gap_k{k}")
        if gap is None:
            return []
        name = baselines[k][0]
        verdict = "ahead of" if gap < AHEAD else "level with" if gap <= 1 / AHEAD else "NOT ahead of"
        lines.append(f"K={k}: distance to the teacher's {REFERENCE_STEPS}-step samples {metrics[f'validation/distance_k{k}']:.4g}, "
                     f"{gap:.3f}x that of the best {k}-evaluation teacher sampler ({name}): {verdict} it")
    return lines


def gap_row(step: int, metrics: dict, steps) -> dict:
    """One validation's gaps as a row of the run's gap history: ``{"step": step, "gap_k1": ..., ...}``."""
    return {"step": int(step), **{f"gap_k{k}": float(metrics[f"validation/gap_k{k}"]) for k in sorted(steps)
                                  if f"validation/gap_k{k}" in metrics}}


def best_gaps(history: list[dict], steps) -> dict[int, tuple[int, float]]:
    """Each K's smallest gap in ``history`` (rows of :func:`gap_row`) and the step of its first occurrence."""
    best = {}
    for row in history:
        for k in sorted(steps):
            gap = row.get(f"gap_k{k}")
            if gap is not None and (k not in best or gap < best[k][1]):
                best[k] = (row["step"], gap)
    return best


def drift_report(history: list[dict], steps) -> list[str]:
    """A line for each K whose gap at the last row of ``history`` is over :data:`DRIFT` times its best earlier one.

    The gap is not FID, and its "ahead" verdict can disagree with the FID ratio, but on the text-to-image
    pipelines it moved with it within a run: sd3's 4-step gap rose 0.47 -> 0.61 while its FID ratio rose 0.80 ->
    1.53 between 1,000 and 2,000 iterations, sd15's 0.67 -> 0.75 with 0.49 -> 0.71 (docs/t2i_demo.md). A rise
    says the student of the earlier step was closer to the teacher at that K: distribution matching drifts."""
    if len(history) < 2:
        return []
    last, lines = history[-1], []
    for k, (step, gap) in best_gaps(history[:-1], steps).items():
        now = last.get(f"gap_k{k}")
        if now is not None and now > DRIFT * gap:
            lines.append(f"K={k}: gap {now:.3f} is {now / gap:.2f}x its best of the run ({gap:.3f} at step {step}): the student "
                         f"has moved away from the teacher at K={k} since; the student of step {step} was closer (that step's "
                         "checkpoint, where one was written)")
    return lines


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

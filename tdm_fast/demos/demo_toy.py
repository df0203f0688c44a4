"""The 2-D demo: train the mixture teacher, distil a student per K, compare with NFE-matched baselines."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import PAPER_FAITHFUL, TDMConfig
from ..denoiser import Denoiser
from ..eval.toy2d import evaluate_toy, format_table
from ..sampling import nfe_matched_baselines, reference_sampler, sample_student
from ..trainer import ClassConditions, TDMTrainer
from .toy2d import NUM_CLASSES, train_toy_teacher

TOY_CFG_SCALE = 3.0


def toy_config(steps: int, iterations: int, seed: int = 0, **overrides) -> TDMConfig:
    """The settings the 2-D demo distils with (a higher lr than the image presets: tiny MLPs)."""
    # measured with the authors' settings (PAPER_FAITHFUL) at a higher fake lr
    settings = dict(
        PAPER_FAITHFUL, steps=(steps,), cfg_scale=TOY_CFG_SCALE, batch_size=256, iterations=iterations, fake_lr=1e-3, seed=seed
    )
    settings.update(overrides)
    return TDMConfig(**settings)


def run_toy_demo(
    out_dir: str | Path = "runs/demo-toy",
    iterations: int = 600,
    teacher_iterations: int = 2000,
    steps: tuple[int, ...] = (1, 2, 4),
    samples: int = 4000,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Writes ``teacher/``, ``student-K{k}/``, ``metrics.json``, ``metrics.md`` and ``scatter.png``.

    ``seed`` seeds the distillation; the teacher is always trained with seed 0, so that runs with
    different seeds distil the same teacher."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = train_toy_teacher(iterations=teacher_iterations, progress=progress)
    teacher.save_pretrained(out / "teacher")
    teacher_seconds = time.perf_counter() - start
    students, train_seconds = {}, {}
    for k in steps:
        t0 = time.perf_counter()
        trainer = TDMTrainer(teacher, toy_config(k, iterations, seed), ClassConditions(NUM_CLASSES), (2,), progress=progress)
        trainer.train()
        train_seconds[k] = time.perf_counter() - t0
        students[k] = trainer.final_student().eval()
        students[k].save_pretrained(out / f"student-K{k}")
    results = evaluate_toy(teacher, students, TOY_CFG_SCALE, samples=samples)
    results["timing_s"] = {"teacher": teacher_seconds, **{f"distill_K{k}": s for k, s in train_seconds.items()}}
    results["iterations"] = iterations
    results["seed"] = seed
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    (out / "metrics.md").write_text(format_table(results) + "\n")
    plot_toy(teacher, students, out / "scatter.png")
    return results


@torch.no_grad()
def plot_toy(teacher: Denoiser, students: dict[int, Denoiser], path: Path, samples: int = 2000, seed: int = 7) -> None:
    """Scatter plots, one column per K: TDM student (top) and the best-SWD baseline candidate (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..eval.toy2d import sliced_wasserstein

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (samples,), generator=g)
    noise = torch.randn(samples, 2, generator=g)
    reference = reference_sampler(100, TOY_CFG_SCALE)(teacher, noise, labels)
    ks = sorted(students)
    fig, axes = plt.subplots(2, len(ks) + 1, figsize=(3.2 * (len(ks) + 1), 6.4), sharex=True, sharey=True)
    panels = [(axes[0][0], reference, "teacher DDIM-100, CFG"), (axes[1][0], reference, "(reference)")]
    for col, k in enumerate(ks, start=1):
        panels.append((axes[0][col], sample_student(students[k], noise, labels, k), f"TDM, K={k} (NFE {k})"))
        candidates = [(s, s(teacher, noise, labels)) for s in nfe_matched_baselines(k, TOY_CFG_SCALE)]
        sampler, points = min(candidates, key=lambda c: sliced_wasserstein(c[1], reference))
        panels.append((axes[1][col], points, f"{sampler.name} (NFE {sampler.nfe})"))
    for ax, points, title in panels:
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="coolwarm", s=2, alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
    fig.suptitle("TDM students vs NFE-matched teacher baselines (colour = class)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

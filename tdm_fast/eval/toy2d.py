"""Metrics on the built-in 2-D teacher: SWD to the teacher's many-step CFG samples, mode precision, coverage."""
from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ..sampling import nfe_matched_baselines, reference_sampler, sample_student
from ..demos.toy2d import NUM_CLASSES, NUM_MODES, classify_modes, mode_owner


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds (equal sizes after truncation)."""
    n = min(a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    pa = (a[:n].double() @ directions).sort(dim=0).values
    pb = (b[:n].double() @ directions).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_precision(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples lying on a mode that their own class owns."""
    modes = classify_modes(points)
    own = (modes >= 0) & (mode_owner()[modes.clamp(min=0)] == labels)
    return float(own.float().mean())


def mode_coverage(points: torch.Tensor, labels: torch.Tensor) -> float:
    """How evenly each class's own modes are hit: normalised entropy of the hit histogram (1 = even)."""
    modes = classify_modes(points)
    owner = mode_owner()
    own_per_class = NUM_MODES // NUM_CLASSES
    scores = []
    for c in range(NUM_CLASSES):
        hits = modes[(labels == c) & (modes >= 0)]
        hits = hits[owner[hits] == c]
        if hits.numel() == 0:
            scores.append(0.0)
            continue
        p = torch.bincount(hits, minlength=NUM_MODES)[owner == c].double() / hits.numel()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        scores.append(float(entropy / math.log(own_per_class)))
    return sum(scores) / len(scores)


def point_metrics(points, labels, reference) -> dict:
    return {
        "swd": sliced_wasserstein(points, reference),
        "precision": mode_precision(points, labels),
        "coverage": mode_coverage(points, labels),
    }


@torch.no_grad()
def evaluate_toy(
    teacher: Denoiser,
    students: dict[int, Denoiser],
    cfg_scale: float,
    samples: int = 4000,
    seed: int = 1234,
    total_steps: int = 900,
    reference_steps: int = 100,
) -> dict:
    """For each K: the student, every NFE-matched baseline candidate and the best of them (by SWD).

    All samplers share the same noise and labels; the reference is the teacher's ``reference_steps``
    DDIM with CFG on the same noise.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (samples,), generator=g)
    noise = torch.randn(samples, 2, generator=g)
    reference = reference_sampler(reference_steps, cfg_scale)(teacher, noise, labels)
    results = {"teacher": {"nfe": 2 * reference_steps, **point_metrics(reference, labels, reference)}}
    for k, student in sorted(students.items()):
        row = {"nfe": k, **point_metrics(sample_student(student, noise, labels, k, total_steps), labels, reference)}
        candidates = {}
        for sampler in nfe_matched_baselines(k, cfg_scale, total_steps):
            candidates[sampler.name] = {"nfe": sampler.nfe, **point_metrics(sampler(teacher, noise, labels), labels, reference)}
        best = min(candidates, key=lambda name: candidates[name]["swd"])
        results[f"K={k}"] = {"tdm": row, "baseline": {"name": best, **candidates[best]}, "candidates": candidates}
    return results


def format_table(results: dict) -> str:
    """A markdown table: TDM vs the best NFE-matched baseline for each K."""
    lines = [
        "| K | sampler | NFE | SWD ↓ | mode precision ↑ | mode coverage ↑ |",
        "|---|---|---|---|---|---|",
    ]
    t = results["teacher"]
    lines.append(f"| - | teacher DDIM-100 CFG (reference) | {t['nfe']} | {t['swd']:.3f} | {t['precision']:.3f} | {t['coverage']:.3f} |")
    for key, row in results.items():
        if not key.startswith("K="):
            continue
        k = key[2:]
        tdm, base = row["tdm"], row["baseline"]
        lines.append(f"| {k} | TDM student | {tdm['nfe']} | {tdm['swd']:.3f} | {tdm['precision']:.3f} | {tdm['coverage']:.3f} |")
        lines.append(f"| {k} | baseline: {base['name']} | {base['nfe']} | {base['swd']:.3f} | {base['precision']:.3f} | {base['coverage']:.3f} |")
    return "\n".join(lines)

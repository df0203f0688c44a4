"""Quality of digits samplers: digits-FID to the teacher's 50-step CFG samples and to real data,
class accuracy, per-class mode coverage and diversity, latency.

Every sampler of one evaluation sees the same noise and the same class labels (balanced: N/10 per
class), so "FID to teacher-50" measures how well a few-step sampler reproduces the teacher's own
many-step CFG samples ("style fidelity", spec §9). Features are the penultimate activations of the
shipped digits classifier (:mod:`tdm_fast.eval.classifier`). With several seeds every number is
reported as mean and standard deviation over seeds (the run-to-run spread of the estimate).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..denoiser import Denoiser
from ..demos.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors
from ..sampling import nfe_matched_baselines, reference_sampler, sample_student
from .classifier import DigitsClassifier, load_classifier
from .fid import fid_from_features, gaussian_stats, frechet_distance

METRICS = ("fid_teacher", "fid_data", "accuracy", "coverage", "diversity")
REFERENCE_ASSET = "digits_teacher50_ref"  # cached teacher-50 CFG samples of the shipped teacher


def eval_inputs(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (N, 1, 8, 8) and balanced labels (class i % 10, shuffled) from one seed."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(samples) % NUM_CLASSES)[torch.randperm(samples, generator=g)]
    noise = torch.randn(samples, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return noise, labels


def shipped_reference_cache(teacher: Denoiser, samples: int, seeds, reference_steps: int = 50, cfg_scale: float = 2.0,
                            check: int = 100, path=None) -> dict:
    """Prefills :func:`evaluate_digits`'s ``cache`` from the shipped teacher-50 samples, where valid.

    An entry is used only if its (samples, seed, steps, CFG) match and the given teacher reproduces
    its first ``check`` images (max abs difference 1e-3) — so a different teacher never hits the
    cache. The check is timed and gives the reference's batched ms/image.
    """
    import json
    from safetensors.torch import load_file

    from ..demos.digits import ASSETS

    stem = Path(path) if path is not None else ASSETS / REFERENCE_ASSET
    if not stem.with_suffix(".json").is_file():
        return {}
    meta = json.loads(stem.with_suffix(".json").read_text())
    if meta["samples"] != samples or meta["reference_steps"] != reference_steps or meta["cfg_scale"] != cfg_scale:
        return {}
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    cache = {}
    sampler = reference_sampler(reference_steps, cfg_scale)
    for seed in seeds:
        if f"seed{seed}" not in tensors:
            continue
        images = tensors[f"seed{seed}"]
        noise, labels = eval_inputs(samples, seed)
        start = time.perf_counter()
        fresh = sampler(teacher, noise[:check], labels[:check])
        elapsed = (time.perf_counter() - start) * samples / check
        if (fresh - images[:check]).abs().max() <= 1e-3:
            cache[(seed, samples, reference_steps, cfg_scale)] = (images, elapsed)
    return cache


def write_reference_cache(teacher: Denoiser, samples: int, seeds, reference_steps: int = 50, cfg_scale: float = 2.0,
                          path=None) -> None:
    """Computes and writes the teacher-50 samples that :func:`shipped_reference_cache` reads."""
    import json
    from safetensors.torch import save_file

    from ..demos.digits import ASSETS

    stem = Path(path) if path is not None else ASSETS / REFERENCE_ASSET
    sampler = reference_sampler(reference_steps, cfg_scale)
    tensors = {}
    for seed in seeds:
        noise, labels = eval_inputs(samples, seed)
        tensors[f"seed{seed}"] = sampler(teacher, noise, labels).contiguous()
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(
        {"samples": samples, "seeds": list(seeds), "reference_steps": reference_steps, "cfg_scale": cfg_scale}, indent=2))


class DigitsMetrics:
    """Holds the classifier and the real data's features; scores a batch of generated images."""

    def __init__(self, classifier: DigitsClassifier | None = None, k: int = 5, bootstrap: int = 0):
        self.classifier = classifier or load_classifier()
        images, self.real_labels = load_digits_tensors("all")
        self.real_features = self.features(images)
        self.real_stats = gaussian_stats(self.real_features)
        self.k = k
        self.bootstrap = bootstrap

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(images[i : i + 1024]) for i in range(0, images.shape[0], 1024)])

    def coverage_diversity(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """Per class, averaged over classes.

        coverage: share of real images whose k-NN ball (k=5, among real images of the class) holds
        at least one generated image of that class (Naeem et al. 2020) — 1 means every mode of the
        class is hit; diversity: mean pairwise feature distance of the generated images of a class
        divided by that of the real images of the class (1 = as diverse as the data).
        """
        cov, div = [], []
        for c in range(NUM_CLASSES):
            real = self.real_features[self.real_labels == c].double()
            gen = feats[labels == c].double()
            if gen.shape[0] < 2:
                cov.append(0.0)
                div.append(0.0)
                continue
            d_real = torch.cdist(real, real)
            radius = d_real.kthvalue(self.k + 1, dim=1).values  # +1: the point itself
            nearest = torch.cdist(real, gen).min(dim=1).values
            cov.append(float((nearest <= radius).double().mean()))
            n_r, n_g = real.shape[0], gen.shape[0]
            div.append(float(torch.cdist(gen, gen).sum() / (n_g * (n_g - 1)) / (d_real.sum() / (n_r * (n_r - 1)))))
        return sum(cov) / len(cov), sum(div) / len(div)

    def bootstrap_std(self, feats: torch.Tensor, reference_features: torch.Tensor | None) -> dict:
        """Bootstrap standard deviations of the FIDs (resampling sample indices; paired with the
        reference, which shares the noise): a cheap estimate of the spread over evaluation seeds."""
        g = torch.Generator().manual_seed(0)
        n, m = feats.shape[0], self.real_features.shape[0]
        fid_t, fid_d = [], []
        for _ in range(self.bootstrap):
            idx = torch.randint(0, n, (n,), generator=g)
            real_idx = torch.randint(0, m, (m,), generator=g)
            fid_d.append(fid_from_features(feats[idx], self.real_features[real_idx]))
            if reference_features is not None:
                fid_t.append(fid_from_features(feats[idx], reference_features[idx]))
        out = {"fid_data_boot_std": statistics.stdev(fid_d)}
        if fid_t:
            out["fid_teacher_boot_std"] = statistics.stdev(fid_t)
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, reference_features: torch.Tensor | None = None) -> dict:
        feats = self.features(images)
        logits = torch.cat([self.classifier.head(feats[i : i + 1024]) for i in range(0, feats.shape[0], 1024)])
        coverage, diversity = self.coverage_diversity(feats, labels)
        out = {
            "fid_data": frechet_distance(*gaussian_stats(feats), *self.real_stats),
            "accuracy": float((logits.argmax(-1) == labels).double().mean()),
            "coverage": coverage,
            "diversity": diversity,
        }
        if reference_features is not None:
            out["fid_teacher"] = fid_from_features(feats, reference_features)
        if self.bootstrap:
            out.update(self.bootstrap_std(feats, reference_features))
        out["features"] = feats
        return out


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def batch1_latency_ms(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], repeats: int = 5) -> float:
    """Median wall time of generating one image (batch 1)."""
    noise, labels = eval_inputs(1, 99)
    fn(noise, labels)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(noise, labels)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _summarise(per_seed: list[dict]) -> dict:
    row = {}
    for key in per_seed[0]:
        values = [r[key] for r in per_seed if key in r]
        if key in ("nfe", "name"):
            row[key] = values[0]
            continue
        row[key] = statistics.fmean(values)
        if len(values) > 1 and not key.endswith("_boot_std"):
            row[f"{key}_std"] = statistics.stdev(values)
    return row


def _digits_samplers(teacher: Denoiser, students: dict[int, Denoiser], cfg_scale: float, reference_steps: int,
                     total_steps: int, baselines: bool) -> tuple[dict[str, tuple[int, Callable]], dict[int, list[str]]]:
    """``{name: (nfe, sample(noise, labels))}`` for the teacher's reference, each student K and (``baselines``) the
    NFE-matched candidates of each K; and ``{K: [candidate names]}``."""
    samplers: dict[str, tuple[int, Callable]] = {}
    reference = reference_sampler(reference_steps, cfg_scale)
    samplers[f"teacher-{reference_steps}"] = (reference.nfe, lambda n, c: reference(teacher, n, c))
    candidate_names: dict[int, list[str]] = {}
    for k, student in sorted(students.items()):
        samplers[f"tdm-{k}"] = (k, lambda n, c, s=student, k=k: sample_student(s, n, c, k, total_steps))
        if baselines:
            candidate_names[k] = []
            for sampler in nfe_matched_baselines(k, cfg_scale, total_steps):
                candidate_names[k].append(sampler.name)
                samplers.setdefault(sampler.name, (sampler.nfe, lambda n, c, s=sampler: s(teacher, n, c)))
    return samplers, candidate_names


def _best_baseline(rows: dict, k: int, names: list[str], reference: str) -> dict:
    """The comparison of student K with the candidate of lowest FID to the reference (mean over seeds)."""
    best = min(names, key=lambda n: rows[n]["fid_teacher"])
    tdm = rows[f"tdm-{k}"]
    return {
        "tdm": f"tdm-{k}",
        "baseline": best,
        "candidates": names,
        "fid_ratio": tdm["fid_teacher"] / max(rows[best]["fid_teacher"], 1e-12),
        "accuracy_gap_to_teacher": tdm["accuracy"] - rows[reference]["accuracy"],
    }


@torch.no_grad()
def evaluate_digits(
    teacher: Denoiser,
    students: dict[int, Denoiser],
    cfg_scale: float,
    samples: int = 1000,
    seeds: tuple[int, ...] = (0,),
    reference_steps: int = 50,
    total_steps: int = 900,
    metrics: DigitsMetrics | None = None,
    baselines: bool = True,
    latency: bool = True,
    keep_images: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: dict | None = None,
) -> dict:
    """Scores the teacher's reference, each student K and every NFE-matched baseline candidate of K.

    Returns ``{"samplers": {name: row}, "comparisons": {"K=4": {...}}, "samples", "seeds", ...}``; a row
    has ``nfe``, ``fid_teacher``, ``fid_data``, ``accuracy``, ``coverage``, ``diversity``,
    ``ms_per_image`` (batched throughput) and ``latency_ms`` (batch 1), plus ``*_std`` over seeds.
    The best baseline of a K is the candidate with the lowest FID to teacher-50 (mean over seeds).
    ``fid_floor`` is the FID between the teacher-50 samples of two seeds (a distance floor for
    samplers that do not share noise with the reference). ``keep_images`` keeps that many images of
    the first seed per sampler under ``images``. ``cache`` (a dict) keeps the reference images per
    (seed, samples, steps, cfg) across calls with the same teacher.
    """
    metrics = metrics or DigitsMetrics()
    say = progress or (lambda _msg: None)
    samplers, candidate_names = _digits_samplers(teacher, students, cfg_scale, reference_steps, total_steps, baselines)

    per_seed: dict[str, list[dict]] = {name: [] for name in samplers}
    images: dict[str, torch.Tensor] = {}
    ref_features = []
    for seed in seeds:
        noise, labels = eval_inputs(samples, seed)
        ref_name = f"teacher-{reference_steps}"
        key = (seed, samples, reference_steps, cfg_scale)
        if cache is not None and key in cache:
            ref_images, elapsed = cache[key]
        else:
            ref_images, elapsed = _timed(lambda: samplers[ref_name][1](noise, labels))
            if cache is not None:
                cache[key] = (ref_images, elapsed)
        ref = metrics(ref_images, labels)
        ref_features.append(ref.pop("features"))
        ref["fid_teacher"] = 0.0
        per_seed[ref_name].append({"nfe": samplers[ref_name][0], **ref, "ms_per_image": 1000 * elapsed / samples})
        if keep_images and seed == seeds[0]:
            images[ref_name] = ref_images[:keep_images]
        say(f"seed {seed}: {ref_name} done")
        for name, (nfe, fn) in samplers.items():
            if name == ref_name:
                continue
            out, elapsed = _timed(lambda: fn(noise, labels))
            row = metrics(out, labels, ref_features[-1])
            row.pop("features")
            per_seed[name].append({"nfe": nfe, **row, "ms_per_image": 1000 * elapsed / samples})
            if keep_images and seed == seeds[0]:
                images[name] = out[:keep_images]
        say(f"seed {seed}: all samplers done")

    rows = {name: _summarise(r) for name, r in per_seed.items()}
    if latency:
        for name, (_, fn) in samplers.items():
            rows[name]["latency_ms"] = batch1_latency_ms(fn)
    results = {
        "samples": samples,
        "seeds": list(seeds),
        "cfg_scale": cfg_scale,
        "reference": f"teacher-{reference_steps}",
        "samplers": rows,
        "comparisons": {},
    }
    if len(ref_features) > 1:
        results["fid_floor"] = fid_from_features(ref_features[0], ref_features[1])
    for k, names in candidate_names.items():
        results["comparisons"][f"K={k}"] = _best_baseline(rows, k, names, f"teacher-{reference_steps}")
    if keep_images:
        results["images"] = images
    return results


def acceptance(results: dict) -> dict:
    """The issue's acceptance checks: K=4 and K=2 at most half the baseline's FID to teacher-50, K=1
    below its baseline, TDM-4 class accuracy within 2 points of teacher-50's."""
    checks = {}
    comps = results["comparisons"]
    for key, limit in (("K=4", 0.5), ("K=2", 0.5), ("K=1", 1.0)):
        if key in comps:
            ratio = comps[key]["fid_ratio"]
            checks[f"{key} fid_ratio {'<=' if limit < 1 else '<'} {limit}"] = bool(ratio <= limit if limit < 1 else ratio < limit)
    if "K=4" in comps:
        checks["K=4 accuracy within 2 points of teacher"] = bool(comps["K=4"]["accuracy_gap_to_teacher"] >= -0.02)
    return checks


def _fmt(row: dict, key: str, digits: int = 2, scale: float = 1.0) -> str:
    if key not in row:
        return "-"
    value = f"{scale * row[key]:.{digits}f}"
    if f"{key}_std" in row:
        value += f" ± {scale * row[key + '_std']:.{digits}f}"
    elif f"{key}_boot_std" in row:
        value += f" ± {scale * row[key + '_boot_std']:.{digits}f}ᵇ"
    return value


def format_table(results: dict) -> str:
    """Markdown: every sampler, then TDM-K vs its NFE-matched baseline."""
    rows = results["samplers"]
    ref = results["reference"]
    lines = [
        f"Samples: {results['samples']} per seed, seeds {results['seeds']}, CFG {results['cfg_scale']}; "
        f"FID on the digits classifier's penultimate features; ± is the std over evaluation seeds, or "
        f"(ᵇ) with one seed the bootstrap std over resampled samples.",
        "",
        "| sampler | NFE | FID to teacher-50 ↓ | FID to data ↓ | class acc. % ↑ | coverage ↑ | diversity | ms/image (batched) | latency ms (batch 1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = [ref] + sorted((n for n in rows if n.startswith("tdm-")), key=lambda n: -int(n[4:]))
    order += [n for n in rows if n not in order]
    for name in order:
        r = rows[name]
        label = f"{name} CFG (reference)" if name == ref else name
        lines.append(
            f"| {label} | {r['nfe']} | {_fmt(r, 'fid_teacher')} | {_fmt(r, 'fid_data')} | {_fmt(r, 'accuracy', 1, 100)} "
            f"| {_fmt(r, 'coverage', 3)} | {_fmt(r, 'diversity', 3)} | {_fmt(r, 'ms_per_image', 3)} | {_fmt(r, 'latency_ms', 1)} |"
        )
    if results.get("comparisons"):
        lines += ["", "| K | TDM FID to teacher-50 | best NFE-matched baseline | its FID | ratio | TDM acc. − teacher acc. (points) |", "|---|---|---|---|---|---|"]
        for key, c in sorted(results["comparisons"].items(), key=lambda kv: -int(kv[0][2:])):
            t, b = rows[c["tdm"]], rows[c["baseline"]]
            lines.append(
                f"| {key[2:]} | {_fmt(t, 'fid_teacher')} | {c['baseline']} | {_fmt(b, 'fid_teacher')} | {c['fid_ratio']:.3f} "
                f"| {100 * c['accuracy_gap_to_teacher']:+.1f} |"
            )
    if "fid_floor" in results:
        lines += ["", f"FID between the teacher-50 samples of two seeds (different noise): {results['fid_floor']:.2f}."]
    return "\n".join(lines)


def save_grid(images: dict[str, torch.Tensor], rows: list[tuple[str, str]], path, columns: int | None = None) -> None:
    """A labelled PNG grid: one row per (key in ``images``, label), same noise and class per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns or min(v.shape[0] for v in images.values())
    width = 0.55 * columns + 1.8
    fig, axes = plt.subplots(len(rows), columns, figsize=(width, 0.62 * len(rows) + 0.2), squeeze=False)
    for r, (key, label) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(((images[key][c, 0].float() + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=1.7 / width, right=0.99, top=0.98, bottom=0.02, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)

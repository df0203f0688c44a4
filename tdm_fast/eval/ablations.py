"""The reproduction table on a digits-scale teacher (paper §5 ablations, at our scale).

Every variant is a steps-aware ("unify") student for K ∈ {1, 2, 4} trained for the same number of
iterations from the same seeds, and differs from the TDM recipe in one setting. The recipe is the
teacher's: :func:`tdm_fast.demos.demo_digits.early_stop_config` for the shipped digits teacher (or a digits teacher
folder), :func:`tdm_fast.eval.stability.suite_config` (a new teacher's TDMConfig defaults) for the other
built-in teachers of :mod:`tdm_fast.demos.teachers` (``builtin_teacher=``; ``tdm-fast eval --ablations
--builtin-teacher NAME``). The variants:

- ``tdm``: noisy-sample matching, importance sampling on, K-conditioning on (the recipe);
- ``clean``: DMD-style clean-sample matching (``matching="clean"``);
- ``no_is``: importance sampling off;
- ``unify_no_k``: one student for K ∈ {1, 2, 4} without the K embedding (``steps_conditioning=False``);
- ``fisher``: the Fisher divergence instead of the reverse KL (``objective="fisher"``, docs/fisher.md);
- ``dpmsolver``: the DPM-Solver++(2M) student trajectory instead of DDIM (``student_solver="dpmsolver"``;
  with ``tdm`` it fills the train × test solver table of :mod:`tdm_fast.eval.solver_ablation`).

Each variant is scored at K = 1, 2, 4 beside the teacher's best NFE-matched DDIM baselines and the
teacher-50 CFG reference, on the same evaluation noise and labels; the spread is over training seeds.
A quality-vs-iterations curve of the ``tdm`` variant (FID to teacher-50 at each K) is written as PNG.
"""
from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path

from ..demos.demo_digits import distill_digits, early_stop_config
from ..demos.teachers import TEACHERS, load_builtin_teacher
from ..demos.digits import load_digits_teacher
from ..sampling import reference_sampler, sample_student
from .digits import DigitsMetrics, eval_inputs, evaluate_digits, shipped_reference_cache
from .solver_ablation import TRAINED, cross_solver_scores, solver_table
from .stability import suite_config

VARIANTS = {
    "tdm": {},
    "clean": {"matching": "clean"},
    "no_is": {"importance_sampling": False},
    "unify_no_k": {"steps_conditioning": False},
    "fisher": {"objective": "fisher"},
    "dpmsolver": {"student_solver": "dpmsolver"},
}
LABELS = {
    "tdm": "TDM (noisy matching, IS, K-conditioned unify)",
    "clean": "clean-sample matching",
    "no_is": "importance sampling off",
    "unify_no_k": "unify without K-conditioning",
    "fisher": "Fisher divergence instead of reverse KL",
    "dpmsolver": "DPM-Solver++(2M) trajectory (trained and tested)",
}
RECIPES = {
    "early_stop_config": "the former digits demo recipe (tdm_fast.demos.demo_digits.early_stop_config)",
    "demo_config": "the digits demo recipe of the time, today tdm_fast.demos.demo_digits.early_stop_config",
    "suite_config": "a new teacher's recipe: TDMConfig defaults with steps, CFG and batch size set "
                    "(tdm_fast.eval.stability.suite_config)",
    "t2i_demo_config": "the pipeline demo's recipe (tdm_fast.demos.t2i_demo.demo_config), LoRA roles, student and fake score "
                       "sampled by the engine and decoded by the pipeline's VAE; baselines through the stock pipeline",
}


class CurveRecorder:
    """Trainer callback: every ``every`` iterations, FID to teacher-50 of the EMA student at each K."""

    def __init__(self, metrics: DigitsMetrics, reference_features, noise, labels, every: int, steps):
        self.metrics, self.ref, self.noise, self.labels = metrics, reference_features, noise, labels
        self.every, self.steps = every, steps
        self.points: list[dict] = []

    def __call__(self, trainer, record) -> None:
        if trainer.step % self.every:
            return
        point = {"iteration": trainer.step}
        with trainer.ema_weights() as student:
            for k in self.steps:
                out = self.metrics(sample_student(student, self.noise, self.labels, k), self.labels, self.ref)
                point[f"fid_teacher_K{k}"] = out["fid_teacher"]
        self.points.append(point)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _teacher_and_recipe(teacher_path: str | Path | None, builtin_teacher: str | None):
    """(teacher, recipe name, config maker): the shipped digits teacher or ``teacher_path`` with the former demo
    recipe, or the built-in teacher ``builtin_teacher`` with the stability suite's recipe."""
    if teacher_path is not None and builtin_teacher is not None:
        raise ValueError(f"give a teacher folder ({teacher_path}) or a built-in teacher ({builtin_teacher}), not both")
    if builtin_teacher in (None, "digits"):
        return load_digits_teacher(teacher_path), "early_stop_config", early_stop_config
    return load_builtin_teacher(builtin_teacher), "suite_config", partial(suite_config, builtin_teacher)


def _score_student(student, config, cross_solvers: bool, metrics, noise, labels, ref_features) -> dict:
    """``{"K=k": scores}`` of the student on the evaluation noise with its own solver, and (``cross_solvers``) its
    scores under the other solvers."""
    def score(samples):
        out = metrics(samples, labels, ref_features)
        out.pop("features")
        return out

    run = {f"K={k}": score(sample_student(student, noise, labels, k, solver=config.student_solver)) for k in config.steps}
    if cross_solvers:
        run["test_solvers"] = cross_solver_scores(
            run, config.student_solver, config.steps,
            lambda k, solver: score(sample_student(student, noise, labels, k, solver=solver)))
    return run


def run_ablations(
    out_dir: str | Path = "runs/ablations",
    iterations: int = 600,
    seeds: tuple[int, ...] = (0, 1, 2),
    variants: tuple[str, ...] = tuple(VARIANTS),
    samples: int = 2000,
    eval_seed: int = 0,
    curve_every: int = 100,
    curve_samples: int = 2000,
    teacher_path: str | Path | None = None,
    builtin_teacher: str | None = None,
    progress: bool = True,
    **config_overrides,
) -> tuple[str, dict]:
    """Trains every variant for every seed and evaluates it; returns (markdown table, results dict).

    The teacher is the shipped digits one, a digits teacher folder (``teacher_path``) or a built-in
    teacher by name (``builtin_teacher``, see :data:`tdm_fast.demos.teachers.TEACHERS`), distilled
    with its recipe (module docstring). Writes ``ablations.json``, ``ablations.md`` and
    ``quality_vs_iterations.png`` into ``out_dir``; partial results are written after each run, so an
    interrupted sweep keeps what it finished.
    """
    teacher_name = builtin_teacher or "digits"
    teacher, recipe, make_config = _teacher_and_recipe(teacher_path, builtin_teacher)  # refused before the folder is made
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = DigitsMetrics()
    say = print if progress else (lambda *_: None)

    # Teacher rows (reference, NFE-matched baselines) once, on the shared evaluation noise.
    cfg = TEACHERS[teacher_name].cfg_scale
    # the shipped teacher-50 samples are the digits teacher's (checked against the given one);
    # for another teacher evaluate_digits samples the reference into the empty cache
    cache = shipped_reference_cache(teacher, samples, (eval_seed,), 50, cfg) if teacher_name == "digits" else {}
    dummy = {k: teacher for k in (1, 2, 4)}  # baselines only; the student rows are discarded
    teacher_eval = evaluate_digits(teacher, dummy, cfg, samples=samples, seeds=(eval_seed,),
                                   metrics=metrics, latency=False, cache=cache)
    teacher_rows = {n: r for n, r in teacher_eval["samplers"].items() if not n.startswith("tdm-")}
    best_baseline = {c[2:]: teacher_eval["comparisons"][c]["baseline"] for c in teacher_eval["comparisons"]}
    noise, labels = eval_inputs(samples, eval_seed)

    results = {"teacher_name": teacher_name, "recipe": recipe, "cfg_scale": cfg,
               "iterations": iterations, "seeds": list(seeds), "samples": samples, "eval_seed": eval_seed,
               "teacher": teacher_rows, "best_baseline": best_baseline, "runs": {}, "curve": {}}
    if teacher_path is not None:
        results["teacher_path"] = str(teacher_path)
    ref_features = metrics.features(cache[(eval_seed, samples, 50, cfg)][0])
    # The resolution of the measure: the teacher-50 itself, sampled from other noise, scored
    # against the reference. Differences between students near this value are not resolved.
    floor_noise, floor_labels = eval_inputs(samples, eval_seed + 1)
    floor_images = reference_sampler(50, cfg)(teacher, floor_noise, floor_labels)
    results["fid_floor"] = metrics(floor_images, floor_labels, ref_features)["fid_teacher"]
    # The curve scores the first ``curve_samples`` of the evaluation set (its cached reference).
    curve_noise, curve_labels, curve_ref = noise[:curve_samples], labels[:curve_samples], ref_features[:curve_samples]

    for variant in variants:
        for seed in seeds:
            config = make_config(iterations, seed=seed, **{**config_overrides, **VARIANTS[variant]})
            recorder = None
            if variant == "tdm" and curve_every:
                recorder = CurveRecorder(metrics, curve_ref, curve_noise, curve_labels, curve_every, config.steps)
            say(f"[ablations] {variant} seed {seed}: training {iterations} iterations")
            trainer, _, wall = distill_digits(teacher, config, progress=progress, callback=recorder)
            run = {"wall_clock_s": wall, **_score_student(trainer.final_student().eval(), config, variant in TRAINED,
                                                          metrics, noise, labels, ref_features)}
            if recorder is not None:
                results["curve"][str(seed)] = recorder.points
            results["runs"].setdefault(variant, {})[str(seed)] = run
            (out_dir / "ablations.json").write_text(json.dumps(results, indent=2))

    table = format_ablations(results)
    (out_dir / "ablations.md").write_text(table + "\n")
    if results["curve"]:
        plot_curve(results["curve"], out_dir / "quality_vs_iterations.png", best_baseline, teacher_rows)
    return table, results


def merge_ablations(parts: list[dict]) -> dict:
    """Combines the results of several :func:`run_ablations` calls (e.g. variants run in parallel)."""
    merged = {**parts[0], "runs": {}, "curve": {}}
    for part in parts:
        for variant, runs in part["runs"].items():
            merged["runs"].setdefault(variant, {}).update(runs)
        merged["curve"].update(part.get("curve", {}))
    merged["seeds"] = sorted({int(s) for runs in merged["runs"].values() for s in runs})
    return merged


def summarise(results: dict) -> dict:
    """variant → K → metric → (mean, std over seeds)."""
    out = {}
    for variant, runs in results["runs"].items():
        out[variant] = {}
        for key in ("K=1", "K=2", "K=4"):
            rows = [r[key] for r in runs.values() if key in r]
            if rows:
                out[variant][key] = {m: _mean_std([r[m] for r in rows]) for m in rows[0]}
    return out


def claims(results: dict) -> list[str]:
    """The paper's ablation claims checked against the run-to-run spread (std over training seeds).

    A claim counts as reproduced when the difference of the means exceeds the larger of the two
    standard deviations; importance sampling on vs off is reported either way. The paper's Fisher
    claim favours the variant, so its verdict is reproduced, within the spread or opposite.
    """
    summary = summarise(results)
    checks = [  # (claim, variant, K, which side the paper favours: "tdm", "variant" or None)
        ("noisy-sample matching beats clean matching at 4 steps (paper Table 7)", "clean", "K=4", "tdm"),
        ("the K-conditioned unify student beats the unconditioned one at 1 step (paper Table 5)", "unify_no_k", "K=1", "tdm"),
        ("importance sampling on vs off at 4 steps (paper Table 5)", "no_is", "K=4", None),
        ("importance sampling on vs off at 1 step", "no_is", "K=1", None),
        ("the Fisher divergence beats the reverse KL at 4 steps (paper Table 8)", "fisher", "K=4", "variant"),
        ("Fisher vs reverse KL at 2 steps (not in the paper)", "fisher", "K=2", "variant"),
        ("Fisher vs reverse KL at 1 step (not in the paper)", "fisher", "K=1", "variant"),
    ]
    lines = []
    for text, other, k, expect in checks:
        if "tdm" not in summary or other not in summary or k not in summary["tdm"] or k not in summary[other]:
            continue
        (m_tdm, s_tdm), (m_other, s_other) = summary["tdm"][k]["fid_teacher"], summary[other][k]["fid_teacher"]
        gain, spread = m_other - m_tdm, max(s_tdm, s_other)
        if expect == "variant":
            verdict = "reproduced" if -gain > spread else "opposite" if gain > spread else "within the spread"
        elif expect == "tdm":
            verdict = "reproduced" if gain > spread else "not reproduced"
        else:
            verdict = "TDM better" if gain > spread else "TDM worse" if -gain > spread else "within the spread"
        floor = f"; the measure's floor {results['fid_floor']:.3f}" if "fid_floor" in results else ""
        lines.append(f"- {text}: FID {m_tdm:.3f} (TDM) vs {m_other:.3f}; difference {gain:+.3f}, spread {spread:.3f}{floor} → **{verdict}**")
    return lines


def format_ablations(results: dict) -> str:
    summary = summarise(results)
    n_seeds = len(results["seeds"])
    # results of earlier sweeps (bench/results) predate the teacher and recipe keys: the digits ones
    teacher = f"`{results.get('teacher_name', 'digits')}`"
    if "teacher_path" in results:
        teacher += f" ({results['teacher_path']})"
    recipe = results.get("recipe", "demo_config")
    lines = [
        f"Teacher {teacher}, CFG {results.get('cfg_scale', 2):g}; recipe `{recipe}`: {RECIPES[recipe]}; "
        f"unify students K ∈ {{1, 2, 4}}, {results['iterations']} iterations each, "
        f"mean ± std over {n_seeds} training seed(s); {results['samples']} evaluation samples; "
        "FID on the digits classifier's features.",
        "",
        "| sampler | FID to teacher-50, K=1 ↓ | K=2 ↓ | K=4 ↓ | FID to data, K=4 ↓ | class acc. %, K=4 |",
        "|---|---|---|---|---|---|",
    ]

    def cell(stats, metric, scale=1.0, digits=2):
        if stats is None:
            return "-"
        mean, std = stats[metric]
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if n_seeds > 1 else f"{scale * mean:.{digits}f}"

    for variant, per_k in summary.items():
        lines.append(
            f"| {LABELS.get(variant, variant)} | {cell(per_k.get('K=1'), 'fid_teacher')} | {cell(per_k.get('K=2'), 'fid_teacher')} "
            f"| {cell(per_k.get('K=4'), 'fid_teacher')} | {cell(per_k.get('K=4'), 'fid_data')} | {cell(per_k.get('K=4'), 'accuracy', 100, 1)} |"
        )
    t = results["teacher"]
    b = results["best_baseline"]
    lines.append(
        "| teacher, best NFE-matched sampler (" + ", ".join(f"K={k}: {b[k]}" for k in sorted(b)) + ") "
        f"| {t[b['1']]['fid_teacher']:.2f} | {t[b['2']]['fid_teacher']:.2f} | {t[b['4']]['fid_teacher']:.2f} "
        f"| {t[b['4']]['fid_data']:.2f} | {100 * t[b['4']]['accuracy']:.1f} |"
    )
    ref = t["teacher-50"]
    lines.append(f"| teacher-50 CFG (reference, NFE 100) | 0 | 0 | 0 | {ref['fid_data']:.2f} | {100 * ref['accuracy']:.1f} |")
    if "fid_floor" in results:
        floor = results["fid_floor"]
        lines.append(f"| teacher-50 CFG from other noise (the measure's floor) | {floor:.2f} | {floor:.2f} | {floor:.2f} | | |")
    checked = claims(results)
    if checked:
        lines += ["", *checked]
    lines += solver_table(results)
    walls = [r["wall_clock_s"] for runs in results["runs"].values() for r in runs.values()]
    if walls:
        lines += ["", f"Training wall-clock: {statistics.fmean(walls):.0f} s per run, {sum(walls) / 60:.1f} min for all {len(walls)} runs."]
    return "\n".join(lines)


def plot_curve(curves: dict, path, best_baseline: dict, teacher_rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {1: "tab:red", 2: "tab:orange", 4: "tab:blue"}
    for k, color in colors.items():
        series = [[p[f"fid_teacher_K{k}"] for p in pts] for pts in curves.values()]
        its = [p["iteration"] for p in next(iter(curves.values()))]
        n = min(len(s) for s in series)
        mean = [statistics.fmean(s[i] for s in series) for i in range(n)]
        ax.plot(its[:n], mean, marker="o", color=color, label=f"TDM K={k}")
        base = teacher_rows[best_baseline[str(k)]]["fid_teacher"]
        ax.axhline(base, color=color, linestyle="--", linewidth=1, label=f"teacher best {k}-NFE DDIM")
    ax.set_yscale("log")
    ax.set_xlabel("TDM iterations")
    ax.set_ylabel("FID to teacher-50 CFG (digits features)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



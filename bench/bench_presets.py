"""Does ``distill --preset`` with no recipe flags beat the teacher's own few-step samplers, on pipelines we
ship and on pipelines we do not? The preset-path stability check of issue 32, as a benchmark.

    tdm-fast bench presets        (many hours on 2 CPU cores; the knobs below narrow it)

Pipelines: the shipped sd15 and sd3 (:mod:`tdm_fast.demos.t2i`) and pipelines built here that are not
shipped, by ``tdm-fast teacher train --dataset digits-t2i``'s own builder under other seeds,
condition-dropout rates and training lengths (:data:`UNSHIPPED`). Each is distilled into a unify
K ∈ {1, 2, 4} student by the demo's path, which is ``distill --preset``'s with no recipe flags
(:func:`tdm_fast.demos.t2i_demo.run_t2i_demo`, no overrides), for every training seed and length (one run
each: a flow preset's rates decay to the run's end), scored like the demo:
FID to the teacher's 50-step samples on the digits classifier's features over the best NFE-matched teacher
sampler (spec §9), and K = 4 class accuracy against the teacher's.

Knobs (environment): ``TDM_PRESETS_PIPELINES`` (default ``"sd15 sd3 sd15-b sd3-b"``; a path names a digits-t2i
pipeline folder built elsewhere), ``TDM_PRESETS_SEEDS``
(``"0 1 2"``), ``TDM_PRESETS_ITERATIONS`` (``"1000 2000"``), ``TDM_PRESETS_SAMPLES`` (2000),
``TDM_PRESETS_OUT``: a folder for the runs and built pipelines (default: pytest's tmp_path); a run or a
pipeline found there finished is kept, so a stopped sweep continues and more seeds widen one;
``TDM_PRESETS_FINISHED_ONLY=1`` trains nothing and tables the runs finished there (a sweep still going, or
seeds that only some pipelines have). ``TDM_PRESETS_CARRY``: a benchmark JSON this benchmark wrote before (the
record in ``bench/results/``); a run it holds that is not finished under ``TDM_PRESETS_OUT`` is taken from it, as
finished, and the table names it with the record's date and commit (runs measured on another machine whose
folders are gone).
Where the preset's rates are constant after warm-up (the ε/v presets), the lengths of one seed are one run, scored
on the way (``runs/<name>-s<seed>-<longest>/iterations-<n>/``): its student at n iterations is the n-iteration run's.
``extra_info["presets"]`` holds every run's ratios; :func:`summarize` renders the table and its checks. The
sweep's time is no speed, so the record compares none with the previous run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path

from tdm_fast.perf.bench_report import NOT_COMPARED


def whole_numbers(knob: str, default: str, least: int) -> tuple[int, ...]:
    """The whole numbers (each at least ``least``) that the environment variable ``knob`` lists, else ``default``'s."""
    text = os.environ.get(knob, default)
    try:
        numbers = tuple(int(word) for word in text.split())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < least:
        raise ValueError(f"{knob} must list whole numbers of at least {least}, separated by spaces; got {text!r}")
    return numbers


PIPELINES = os.environ.get("TDM_PRESETS_PIPELINES", "sd15 sd3 sd15-b sd3-b").split()
SEEDS = whole_numbers("TDM_PRESETS_SEEDS", "0 1 2", least=0)
ITERATIONS = whole_numbers("TDM_PRESETS_ITERATIONS", "1000 2000", least=1)
SAMPLES = whole_numbers("TDM_PRESETS_SAMPLES", "2000", least=2)[0]
OUT = os.environ.get("TDM_PRESETS_OUT")
FINISHED_ONLY = os.environ.get("TDM_PRESETS_FINISHED_ONLY", "") not in ("", "0")
CARRY = os.environ.get("TDM_PRESETS_CARRY")
# Pipelines of the shipped kinds that are not shipped: another seed, condition-dropout rate and length.
UNSHIPPED = {
    "sd15-b": {"name": "sd15", "seed": 7, "cond_dropout": 0.2},
    "sd3-b": {"name": "sd3", "seed": 11, "cond_dropout": 0.05, "iterations": 1500},
}
# What "beats the baseline with a margin" means (issue 32's acceptance)
LIMITS = {"K=1": 0.5, "K=2": 0.5, "K=4": 0.8}
ACCURACY_POINTS = 2.0


def pipeline_folder(name: str, root: Path) -> tuple[str, Path]:
    """(kind, folder) of ``name``: a shipped pipeline, one of :data:`UNSHIPPED` built under ``root``, or the path of
    a digits-t2i pipeline folder of a shipped kind built elsewhere (``tdm-fast teacher train --dataset digits-t2i``)."""
    from tdm_fast.demos import t2i

    if name in t2i.PIPELINES:
        return name, t2i.shipped_pipeline(name)
    if name in UNSHIPPED:
        settings = UNSHIPPED[name]
        folder = root / "pipelines" / name
        if not (folder / "build.json").is_file():
            t2i.build_pipeline(out=folder, progress=False, threads=None, **settings)  # the process's own thread count
        return settings["name"], folder
    folder = Path(name)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"TDM_PRESETS_PIPELINES: {name!r} is not a shipped pipeline {t2i.PIPELINES}, one built here "
                         f"{tuple(UNSHIPPED)} or a pipeline folder (no model_index.json)")
    return t2i.pipeline_kind(folder), folder


def run_name(name: str, seed: int, iterations: int | str) -> str:
    """The run folder's name: a pipeline given by a path is named by its folder's name and a hash of its full path."""
    if os.sep in name:
        folder = Path(name).resolve()
        name = f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:6]}"
    return f"{name}-s{seed}-{iterations}"


def finished_folder(root: Path, name: str, seed: int, iterations: int) -> Path | None:
    """The folder of a finished run of ``name`` and ``seed`` at ``iterations``: its own run's, or a longer run's
    scores on the way (``iterations-<n>/``, only ever written where the rates are constant)."""
    candidates = [root / "runs" / run_name(name, seed, iterations),
                  *sorted((root / "runs").glob(f"{run_name(name, seed, '*')}/iterations-{iterations}"))]
    return next((folder for folder in candidates if (folder / "metrics.json").is_file()), None)


def train_missing(name: str, seed: int, root: Path, missing: list[int]) -> None:
    """Trains the runs of ``missing`` lengths with the preset path's defaults: one run each where the rates decay to
    the run's end (a longer run's student at n iterations is not the n-iteration run's), else one run of the
    longest, scored on the way at the others."""
    from tdm_fast.demos.t2i_demo import demo_config, run_t2i_demo

    kind, model = pipeline_folder(name, root)
    longest = max(missing)
    constant = demo_config(kind, longest, seed=seed, model=model).lr_decay == "constant"
    plan = {longest: tuple(n for n in missing if n < longest)} if constant else {n: () for n in missing}
    for n, score_at in sorted(plan.items()):
        run_t2i_demo(kind, root / "runs" / run_name(name, seed, n), iterations=n, samples=SAMPLES, seed=seed,
                     model=model, progress=False, score_at=score_at)


def carried_runs(path: str | None) -> dict[tuple, dict]:
    """The runs of an earlier record of this benchmark, by (pipeline, seed, iterations), each naming where it was
    measured (``carried_from``: the record's date and commit, or what it named itself)."""
    if not path:
        return {}
    record = json.loads(Path(path).read_text())
    origin = f"{record['datetime'][:10]}, commit {record.get('commit_info', {}).get('id', '?')[:7]}"
    runs = {}
    for bench in record["benchmarks"]:
        for row in bench.get("extra_info", {}).get("presets", {}).get("runs", []):
            runs[row["pipeline"], row["seed"], row["iterations"]] = {"carried_from": origin, **row}
    return runs


def run_one(name: str, seed: int, root: Path, carried: dict | None = None) -> list[dict]:
    """The students of the preset path's defaults at each of :data:`ITERATIONS`, scored; a run finished under
    ``root`` is read back and one in ``carried`` (:func:`carried_runs`) taken as it is."""
    carried = carried or {}
    folders = {n: finished_folder(root, name, seed, n) for n in ITERATIONS}
    missing = [n for n, folder in folders.items() if folder is None and (name, seed, n) not in carried]
    if missing and not FINISHED_ONLY:
        train_missing(name, seed, root, missing)
        folders = {n: finished_folder(root, name, seed, n) for n in ITERATIONS}
    rows = []
    for n, folder in sorted(folders.items()):
        if folder is None:
            if (name, seed, n) in carried:
                rows.append(carried[name, seed, n])
            continue
        results = json.loads((folder / "metrics.json").read_text())
        row = {"pipeline": name, "seed": seed, "iterations": n, "distill_argv": results["distill_argv"]}
        for key, entry in results["comparisons"].items():
            row[key] = {"fid_ratio": entry["fid_ratio"], "baseline": entry["baseline"],
                        "accuracy_gap_points": 100 * entry["accuracy_gap_to_teacher"]}
        rows.append(row)
    return rows


def test_presets(benchmark, tmp_path):
    root = Path(OUT) if OUT else tmp_path
    out = {}

    def sweep():
        carried = carried_runs(CARRY)
        out["runs"] = [row for name in PIPELINES for seed in SEEDS for row in run_one(name, seed, root, carried)]

    benchmark.pedantic(sweep, rounds=1, iterations=1)
    benchmark.extra_info["presets"] = {"runs": out["runs"], "limits": LIMITS, "accuracy_points": ACCURACY_POINTS}
    benchmark.extra_info[NOT_COMPARED] = ("the sweep trains only the runs not finished on disk and reads back the rest, "
                                          "so its time says what was missing, not how fast anything is")


def checks(runs: list[dict]) -> list[dict]:
    """Per pipeline and length: the mean ratio per K over seeds, the worst seed, and whether every seed passes."""
    rows = []
    for name in dict.fromkeys(r["pipeline"] for r in runs):
        for n in sorted({r["iterations"] for r in runs if r["pipeline"] == name}):
            mine = [r for r in runs if r["pipeline"] == name and r["iterations"] == n]
            row = {"pipeline": name, "iterations": n, "seeds": len(mine), "pass": True}
            for key, limit in LIMITS.items():
                ratios = [r[key]["fid_ratio"] for r in mine]
                row[key] = (statistics.fmean(ratios), max(ratios))
                row["pass"] &= max(ratios) <= limit
            gaps = [r["K=4"]["accuracy_gap_points"] for r in mine]
            row["accuracy"] = (statistics.fmean(gaps), min(gaps))
            row["pass"] &= min(gaps) >= -ACCURACY_POINTS
            rows.append(row)
    return rows


def summarize(benchmarks) -> str:
    for b in benchmarks:
        data = b.get("extra_info", {}).get("presets")
        if not data:
            continue
        lines = ["`distill --preset` defaults, no recipe flags: FID ratio to the best NFE-matched teacher sampler "
                 "(mean over seeds, worst seed in brackets); limits K=1, 2 <= 0.5, K=4 <= 0.8, K=4 accuracy within "
                 f"{ACCURACY_POINTS:g} points of the teacher's", "",
                 "| pipeline | iterations | seeds | K=1 | K=2 | K=4 | K=4 acc. − teacher (points) | all seeds pass |",
                 "|---|---|---|---|---|---|---|---|"]
        runs = data["runs"]
        knobs = {"PIPELINES": dict.fromkeys(r["pipeline"] for r in runs),
                 "SEEDS": [str(seed) for seed in sorted({r["seed"] for r in runs})],
                 "ITERATIONS": [str(n) for n in sorted({r["iterations"] for r in runs})]}
        lines[1:1] = ["", "Reproduce: `" + " ".join(f'TDM_PRESETS_{k}="{" ".join(v)}"' for k, v in knobs.items())
                      + " tdm-fast bench presets`"]
        for row in checks(runs):
            cells = [f"{row[k][0]:.2f} ({row[k][1]:.2f})" for k in LIMITS]
            lines.append(f"| {row['pipeline']} | {row['iterations']} | {row['seeds']} | " + " | ".join(cells)
                         + f" | {row['accuracy'][0]:+.1f} ({row['accuracy'][1]:+.1f}) | {'yes' if row['pass'] else '**no**'} |")
        origins = {}
        for r in runs:
            if "carried_from" in r:
                origins.setdefault(r["carried_from"], []).append(f"{r['pipeline']} s{r['seed']} {r['iterations']}")
        if origins:
            lines += ["", "Runs carried from an earlier record of this benchmark (`TDM_PRESETS_CARRY`; measured then, "
                      "their folders are not on this machine): "
                      + "; ".join(f"{origin}: {', '.join(names)}" for origin, names in origins.items()) + "."]
        return "\n".join(lines)
    return ""


def figure(benchmarks):
    """Every run's FID ratio per K, one column per pipeline and length, each seed a point, the limits dashed: the
    table of :func:`summarize` at a glance, with the spread over seeds it averages away."""
    runs = next((b["extra_info"]["presets"]["runs"] for b in benchmarks if b.get("extra_info", {}).get("presets")), None)
    if not runs:
        return None
    import matplotlib.pyplot as plt

    groups = checks(runs)
    fig, axes = plt.subplots(1, len(LIMITS), figsize=(4 * len(LIMITS), 3.8), sharey=True)
    for ax, (key, limit) in zip(axes, LIMITS.items()):
        for x, group in enumerate(groups):
            ratios = [r[key]["fid_ratio"] for r in runs
                      if r["pipeline"] == group["pipeline"] and r["iterations"] == group["iterations"]]
            worst = group[key][1]
            ax.scatter([x] * len(ratios), ratios, s=18, color="tab:blue" if worst <= limit else "tab:red", zorder=3)
        ax.axhline(limit, ls="--", color="tab:red", lw=1, label=f"limit {limit:g}")
        ax.axhline(1.0, ls=":", color="gray", lw=1, label="baseline (1.0)")
        ax.set_xticks(range(len(groups)), [f"{g['pipeline']} {g['iterations']}" for g in groups], rotation=60, fontsize=7)
        ax.set_title(f"{key}: FID ratio to the best NFE-matched baseline", fontsize=8)
        ax.set_ylim(0, max(1.1, max(r[key]["fid_ratio"] for r in runs) * 1.05))
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("student FID / baseline FID (each seed a point)", fontsize=8)
    return fig


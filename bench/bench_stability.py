"""Does the default recipe hold? The stability suite of issue 17 as a benchmark.

    tdm-fast bench stability          (~1.5 hours on 2 CPU cores; TDM_STABILITY_ITERATIONS shortens it)

Knobs (environment): ``TDM_STABILITY_ITERATIONS`` (default 2000), ``TDM_STABILITY_SEEDS`` (default "0 1"),
``TDM_STABILITY_OUT``: a folder for the sweep's own files (default: pytest's tmp_path); a sweep there is
resumed, its finished runs kept (``run_stability(resume=True)``), so a stopped sweep continues and more
seeds widen one; ``extra_info["stability"]["resumed_runs"]`` says how many were kept, and the
benchmark's time covers only the runs made.

Runs ``tdm_fast.eval.stability.run_stability``: every built-in digits-scale teacher
(``tdm_fast.demos.teachers``) distilled into a steps-aware K ∈ {1, 2, 4} student by ``TDMConfig`` with
only steps, cfg_scale, batch_size and iterations set, at the default learning rates × 0.3, 1 and 3, plus
the paper-faithful settings, scored every 200 iterations against the best NFE-matched baseline. The
benchmark's time is the sweep's wall-clock; ``extra_info`` holds the curves, which ``summarize``
renders as the ratio table with its pass/fail checks.
"""
from __future__ import annotations

import os

ITERATIONS = int(os.environ.get("TDM_STABILITY_ITERATIONS", "2000"))
SEEDS = tuple(int(s) for s in os.environ.get("TDM_STABILITY_SEEDS", "0 1").split())
OUT = os.environ.get("TDM_STABILITY_OUT")


def test_stability(benchmark, tmp_path):
    from tdm_fast.config import PAPER_FAITHFUL
    from tdm_fast.eval.stability import run_stability

    out = {}

    def sweep():
        out["results"] = run_stability(OUT or tmp_path, recipes={"default": {}, "paper": PAPER_FAITHFUL}, seeds=SEEDS,
                                       iterations=ITERATIONS, every=200 if ITERATIONS >= 1000 else max(1, ITERATIONS // 5),
                                       progress=False, resume=bool(OUT))

    benchmark.pedantic(sweep, rounds=1, iterations=1)
    results = out["results"]
    benchmark.extra_info["stability"] = results
    # one curve plot per teacher (bench_report draws dict-of-list entries): the mean over seeds at lr × 1
    for teacher in dict.fromkeys(r["teacher"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["teacher"] == teacher and r["lr_multiplier"] == 1.0]
        curve = {"iteration": [p["iteration"] for p in runs[0]["points"]]}
        for recipe in dict.fromkeys(r["recipe"] for r in runs):
            mine = [r for r in runs if r["recipe"] == recipe]
            for k in (1, 2, 4):
                curve[f"K={k} {recipe}"] = [sum(r["points"][i][f"K={k}"]["ratio"] for r in mine) / len(mine)
                                            for i in range(len(curve["iteration"]))]
        benchmark.extra_info[f"FID ratio to the best NFE-matched baseline vs iteration, {teacher}"] = curve


def summarize(benchmarks) -> str:
    from tdm_fast.eval.stability import format_stability

    for b in benchmarks:
        results = b.get("extra_info", {}).get("stability")
        if results:
            return format_stability(results)
    return ""

"""The paper's Table 6 on the digits teacher: train on the DDIM or the DPM-Solver++(2M) trajectory,
sample with either (docs/student_solver.md).

In the ablation sweep (:mod:`tdm_fast.eval.ablations`) the ``tdm`` variant is the DDIM-trained student
and ``dpmsolver`` the DPM-Solver-trained one. Each is also scored with the solver it was not trained
with, at every K where the two solvers differ (K >= 3; with K <= 2 they sample identically), on the
sweep's evaluation set. The 2 × 2 table reports FID to teacher-50 (mean ± std over training seeds)
beside the paper's HPS, and states the paper's directions as reproduced / within the spread / opposite.
"""
from __future__ import annotations

import statistics

from ..solvers import SOLVERS

TRAINED = {"tdm": "ddim", "dpmsolver": "dpmsolver"}  # ablation variant -> the solver it trains with
NAMES = {"ddim": "DDIM", "dpmsolver": "DPM-Solver++(2M)"}
PAPER_HPS = {  # (train, test) -> HPS on SD1.5, 4 steps (paper Table 6; higher is better)
    ("ddim", "ddim"): 31.04, ("ddim", "dpmsolver"): 31.35, ("dpmsolver", "ddim"): 30.86, ("dpmsolver", "dpmsolver"): 31.30,
}


def cross_solver_scores(run: dict, trained: str, steps, score_with) -> dict:
    """``{"K=k": {test solver: metrics}}`` for K >= 3: the trained solver's scores from ``run`` (the
    sweep's own per-K scores), the other solver's from ``score_with(k, solver)``."""
    other = next(s for s in SOLVERS if s != trained)
    return {f"K={k}": {trained: run[f"K={k}"], other: score_with(k, other)} for k in steps if k >= 3}


def _cell(results: dict, train: str, test: str, key: str) -> tuple[float, float] | None:
    variant = next(v for v, s in TRAINED.items() if s == train)
    values = [r["test_solvers"][key][test]["fid_teacher"] for r in results["runs"].get(variant, {}).values()
              if key in r.get("test_solvers", {})]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _verdict(better: tuple[float, float], worse: tuple[float, float]) -> tuple[str, float, float]:
    """The paper says ``better`` beats ``worse``: FID difference (worse - better), spread, verdict."""
    gain, spread = worse[0] - better[0], max(better[1], worse[1])
    verdict = "reproduced" if gain > spread else "opposite" if -gain > spread else "within the spread"
    return verdict, gain, spread


def solver_table(results: dict, k: int = 4) -> list[str]:
    """Markdown lines of the 2 × 2 train/test-solver table at K = ``k`` and the paper's directions
    (empty when the sweep ran neither solver variant at that K)."""
    key = f"K={k}"
    cells = {(train, test): _cell(results, train, test, key) for train in SOLVERS for test in SOLVERS}
    if not any(cells.values()):
        return []

    def show(stats):
        return "-" if stats is None else f"{stats[0]:.3f} ± {stats[1]:.3f}"

    lines = ["", f"Student solver, trained × tested, at K = {k}: FID to teacher-50 ↓ (mean ± std over seeds); "
                 "the paper's HPS ↑ on SD1.5 (Table 6) in brackets.", "",
             "| trained on | tested with DDIM | tested with DPM-Solver++(2M) |", "|---|---|---|"]
    for train in SOLVERS:
        row = " | ".join(f"{show(cells[train, test])} [{PAPER_HPS[train, test]:.2f}]" for test in SOLVERS)
        lines.append(f"| {NAMES[train]} | {row} |")
    checks = [  # (claim, the cell the paper favours, the other)
        ("a DDIM-trained student samples better with DPM-Solver than with DDIM", ("ddim", "dpmsolver"), ("ddim", "ddim")),
        ("a DPM-Solver-trained student samples better with DPM-Solver than with DDIM", ("dpmsolver", "dpmsolver"), ("dpmsolver", "ddim")),
        ("tested with DPM-Solver, the DDIM-trained student is better", ("ddim", "dpmsolver"), ("dpmsolver", "dpmsolver")),
        ("tested with DDIM, the DDIM-trained student is better", ("ddim", "ddim"), ("dpmsolver", "ddim")),
    ]
    floor = f"; the measure's floor {results['fid_floor']:.3f}" if "fid_floor" in results else ""
    lines.append("")
    for text, better, worse in checks:
        if cells[better] is None or cells[worse] is None:
            continue
        verdict, gain, spread = _verdict(cells[better], cells[worse])
        paper = f"HPS {PAPER_HPS[better]:.2f} vs {PAPER_HPS[worse]:.2f}"
        lines.append(f"- {text} (paper: {paper}): FID {cells[better][0]:.3f} vs {cells[worse][0]:.3f}; difference "
                     f"{gain:+.3f}, spread {spread:.3f}{floor} → **{verdict}**")
    return lines

"""The ablation sweep of :mod:`tdm_fast.eval.ablations` on the trained tiny text-to-image pipelines:
reverse KL vs the Fisher divergence, and the 2 × 2 train/test student-solver table (issue 19 item 3).

Every run is the demo's: ``tdm-fast distill --preset`` 's own code with LoRA roles and the pipeline's
recipe (:func:`tdm_fast.demos.t2i_demo.demo_config`), one setting changed per variant
(:data:`tdm_fast.eval.ablations.VARIANTS`). Students are sampled by the engine's sampler with the solver
they were trained with (and, for the solver table, the other one) and decoded by the folder's VAE. The
teacher rows are the stock pipeline's NFE-matched baselines of spec §9 on the same prompts and latents;
the measure's floor is the teacher-50 itself from other prompts and latents. The table has the shape
and the verdicts of the digits ablation table (:func:`tdm_fast.eval.ablations.format_ablations`).

``python -m tdm_fast.demos.t2i_ablations --pipeline sd15 --iterations 400 --seeds 0 1 2``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..eval.ablations import VARIANTS, format_ablations
from ..eval.solver_ablation import TRAINED, cross_solver_scores
from . import t2i
from .t2i_demo import CFG, evaluate_pipelines
from .t2i_layouts import EngineScorer, train_layout

DEFAULT_VARIANTS = ("tdm", "fisher", "dpmsolver")


def run_pipeline_ablations(pipeline: str, out: str | Path, variants=DEFAULT_VARIANTS, seeds=(0, 1, 2), iterations: int = 400,
                           samples: int = 2000, say=print) -> tuple[str, dict]:
    """Trains every variant for every seed on the shipped ``pipeline`` and scores it; returns (markdown
    table, results). Writes ``ablations.json`` after every run (a stopped sweep keeps what it finished)
    and ``ablations.md`` at the end."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = t2i.shipped_pipeline(pipeline)
    teacher = evaluate_pipelines(pipeline, model_dir, None, samples=samples, say=say)  # reference and NFE-matched baselines
    best = {key[2:]: entry["baseline"] for key, entry in teacher["comparisons"].items()}
    score = EngineScorer(pipeline, model_dir, samples, reference8=teacher["reference_images8"])
    results = {"teacher_name": f"{pipeline} (trained tiny pipeline, LoRA roles)", "recipe": "t2i_demo_config",
               "cfg_scale": CFG[pipeline], "iterations": iterations, "seeds": list(seeds), "samples": samples,
               "eval_seed": 0, "teacher": teacher["samplers"], "best_baseline": best, "fid_floor": score.floor(), "runs": {}}
    say(f"measure's floor (teacher-50 from other prompts and latents): FID {results['fid_floor']:.3f}")
    for variant in variants:
        for seed in seeds:
            student, config, wall = train_layout(pipeline, model_dir, out, "lora-roles", seed, iterations, **VARIANTS[variant])
            run = {"wall_clock_s": wall}
            for k in config.steps:
                run[f"K={k}"] = score(student, k, config.total_steps, config.student_solver)
            if variant in TRAINED:
                run["test_solvers"] = cross_solver_scores(run, config.student_solver, config.steps,
                                                          lambda k, solver: score(student, k, config.total_steps, solver))
            results["runs"].setdefault(variant, {})[str(seed)] = run
            say(f"{variant} seed {seed}: " + ", ".join(f"K={k} FID {run[f'K={k}']['fid_teacher']:.3f}" for k in config.steps)
                + f" ({wall:.0f} s)")
            (out / "ablations.json").write_text(json.dumps(results, indent=2))
    table = format_ablations(results)
    (out / "ablations.md").write_text(table + "\n")
    return table, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdm_fast.demos.t2i_ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", choices=t2i.PIPELINES, default="sd15")
    parser.add_argument("--out", default=None, help="default runs/ablations-<pipeline>")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    args = parser.parse_args(argv)
    table, _ = run_pipeline_ablations(args.pipeline, args.out or f"runs/ablations-{args.pipeline}", tuple(args.variants),
                                      tuple(args.seeds), args.iterations, args.samples)
    print(table)


if __name__ == "__main__":
    main()

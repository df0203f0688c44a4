"""``tdm-fast demo``: distil the shipped digits teacher into one 1/2/4-step student on a CPU, then
evaluate it against the teacher's NFE-matched training-free samplers.

Writes to ``out_dir``: ``grid.png`` (rows: teacher 50-step CFG, the teacher's best 4-NFE DDIM
baseline, TDM at 4, 2 and 1 steps; the same noise and class in each column), ``metrics.json`` and
``metrics.md`` (FID to teacher-50, FID to data, class accuracy, coverage, latency per sampler;
training wall-clock and iterations; the acceptance checks), ``train_log.jsonl`` and the student
(``student/``, a ``Denoiser.save_pretrained`` folder usable by ``tdm-fast sample`` / ``export``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import TDMConfig
from .digits import DIGITS_CFG_SCALE, IMAGE_SIZE, NUM_CLASSES, load_digits_teacher
from .trainer import ClassConditions, TDMTrainer

# The demo's distillation recipe (steps-aware "unify" student, K ∈ {1, 2, 4}); see bench notes in
# tdm_fast/eval/ablations.py for how it was chosen.
DEMO_ITERATIONS = 600


def demo_config(iterations: int = DEMO_ITERATIONS, seed: int = 0, **overrides) -> TDMConfig:
    """The digits recipe: TDMConfig(steps=(1, 2, 4)) with steps conditioning, CFG 2, EMA, warm-up."""
    settings = dict(
        steps=(1, 2, 4),
        steps_conditioning=True,
        cfg_scale=DIGITS_CFG_SCALE,
        fake_lr=1e-3,
        generator_lr_ratio=0.2,
        warmup_steps=50,
        ema_decay=0.98,
        batch_size=128,
        iterations=iterations,
        seed=seed,
        kernels="reference",  # 8×8 images: the elementwise ops are negligible; avoids compile time
        log_every=10,
    )
    settings.update(overrides)
    return TDMConfig(**settings)


def distill_digits(teacher, config: TDMConfig, progress: bool = True, callback=None):
    """Runs TDM on the digits teacher; returns (trainer, history, wall-clock seconds)."""
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (1, IMAGE_SIZE, IMAGE_SIZE), output_dir=None, progress=progress)
    start = time.perf_counter()
    history = trainer.train(callback=callback)
    return trainer, history, time.perf_counter() - start


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run_digits_demo(
    out_dir: str | Path = "runs/demo",
    iterations: int = DEMO_ITERATIONS,
    samples: int = 1000,
    seeds: tuple[int, ...] = (0,),
    columns: int = 20,
    seed: int = 0,
    teacher_path: str | Path | None = None,
    progress: bool = True,
    latency: bool = True,
    **config_overrides,
) -> dict:
    """Distils, evaluates and writes the demo's files; returns the metrics dict (also ``metrics.json``)."""
    from .eval.digits import DigitsMetrics, acceptance, evaluate_digits, format_table, save_grid

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher = load_digits_teacher(teacher_path)
    config = demo_config(iterations, seed=seed, **config_overrides)
    trainer, history, train_s = distill_digits(teacher, config, progress=progress)
    with open(out_dir / "train_log.jsonl", "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    student_dir = out_dir / "student"
    trainer.save_student(student_dir)
    student = trainer.final_student().eval()

    say = print if progress else None
    t_eval = time.perf_counter()
    results = evaluate_digits(
        teacher, {k: student for k in config.steps}, config.cfg_scale, samples=samples, seeds=seeds,
        metrics=DigitsMetrics(), latency=latency, keep_images=columns, progress=say,
    )
    eval_s = time.perf_counter() - t_eval
    images = results.pop("images")
    base4 = results["comparisons"]["K=4"]["baseline"] if "K=4" in results["comparisons"] else None
    grid_rows = [(results["reference"], f"teacher {results['reference'].split('-')[1]}-step CFG")]
    if base4:
        grid_rows.append((base4, f"teacher DDIM 4 NFE\n({base4})"))
    grid_rows += [(f"tdm-{k}", f"TDM {k} step{'s' if k > 1 else ''}") for k in sorted(config.steps, reverse=True)]
    save_grid(images, grid_rows, out_dir / "grid.png", columns)

    results["training"] = {
        "iterations": config.iterations,
        "wall_clock_s": train_s,
        "s_per_iteration": train_s / max(1, config.iterations),
        "config": config.to_dict(),
        "threads": torch.get_num_threads(),
    }
    results["eval_wall_clock_s"] = eval_s
    results["total_wall_clock_s"] = time.perf_counter() - t_start
    results["acceptance"] = acceptance(results)
    results["student"] = str(student_dir)
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(results), indent=2))
    md = [
        "# TDM digits demo",
        "",
        f"Unify student K ∈ {list(config.steps)}, {config.iterations} iterations, batch {config.batch_size}, "
        f"training {train_s:.0f} s, evaluation {eval_s:.0f} s, total {results['total_wall_clock_s']:.0f} s "
        f"on {torch.get_num_threads()} thread(s).",
        "",
        format_table(results),
        "",
        "Acceptance: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results["acceptance"].items()),
        "",
        "![samples](grid.png)",
        "",
    ]
    (out_dir / "metrics.md").write_text("\n".join(md))
    return _jsonable(results)


def add_demo_arguments(parser) -> None:
    """argparse options of ``tdm-fast demo``."""
    parser.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--iterations", type=int, default=DEMO_ITERATIONS)
    parser.add_argument("--samples", type=int, default=1000, help="evaluation samples per seed")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default=None, help="a saved digits teacher folder (default: the shipped one)")
    parser.add_argument("--no-progress", action="store_true")


def run_demo(args) -> dict:
    results = run_digits_demo(
        args.output, iterations=args.iterations, samples=args.samples, seeds=tuple(args.eval_seeds),
        seed=args.seed, teacher_path=args.teacher, progress=not args.no_progress,
    )
    print((Path(args.output) / "metrics.md").read_text())
    return results

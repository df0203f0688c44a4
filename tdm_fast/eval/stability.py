"""Does a recipe hold? FID-vs-iteration curves of a distillation against the teacher's best NFE-matched
samplers, on the built-in digits-scale teachers.

One :class:`CurveEvaluator` per teacher fixes the evaluation noise and labels, computes the teacher's
50-step CFG reference once and the FID of every NFE-matched baseline candidate (spec §9) once; during
training it scores the student's EMA weights at each K every ``every`` iterations. A point's ``ratio``
is the student's FID to teacher-50 divided by the best baseline's at the same K.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..sampling import nfe_matched_baselines, reference_sampler, sample_student
from .digits import DigitsMetrics, eval_inputs


class CurveEvaluator:
    """FID to teacher-50 of students of one teacher, and the best NFE-matched baseline per K."""

    def __init__(self, teacher, cfg_scale: float, steps, samples: int = 1000, seed: int = 0, total_steps: int = 900,
                 metrics: DigitsMetrics | None = None):
        self.teacher, self.steps = teacher, tuple(steps)
        self.metrics = metrics or DigitsMetrics()
        self.noise, self.labels = eval_inputs(samples, seed)
        with torch.no_grad():
            self.reference_images = reference_sampler(50, cfg_scale)(teacher, self.noise, self.labels)
            self.reference = self.metrics.features(self.reference_images)
            # the floor of the measure: teacher-50 from other noise against the evaluation's teacher-50
            other_noise, other_labels = eval_inputs(samples, seed + 1000)
            other = reference_sampler(50, cfg_scale)(teacher, other_noise, other_labels)
        teacher_50 = self._fid(other, other_labels)
        self.floor, self.teacher_fid_data = teacher_50["fid_teacher"], teacher_50["fid_data"]
        self.baselines = {}
        for k in self.steps:
            scores = {s.name: self._fid(s(teacher, self.noise, self.labels), self.labels)["fid_teacher"]
                      for s in nfe_matched_baselines(k, cfg_scale, total_steps)}
            best = min(scores, key=scores.get)
            self.baselines[k] = {"name": best, "fid_teacher": scores[best], "candidates": scores}

    def _fid(self, images, labels) -> dict:
        out = self.metrics(images, labels, self.reference)
        return {key: out[key] for key in ("fid_teacher", "fid_data", "accuracy", "diversity")}

    @torch.no_grad()
    def score(self, student) -> dict:
        """{K: fid_teacher, its ratio to the best baseline, fid_data, accuracy, diversity, and the RMS pixel
        distance to the teacher-50 sample of the same noise (paired_rmse)} of a steps-aware student."""
        out = {}
        for k in self.steps:
            images = sample_student(student, self.noise, self.labels, k)
            point = self._fid(images, self.labels)
            point["paired_rmse"] = float((images - self.reference_images).pow(2).mean().sqrt())
            point["ratio"] = point["fid_teacher"] / self.baselines[k]["fid_teacher"]
            out[k] = point
        return out


class CurveRecorder:
    """Trainer callback: scores the EMA student every ``every`` iterations (and at iteration 0 when asked)."""

    def __init__(self, evaluator: CurveEvaluator, every: int, extra=None, say=None):
        self.evaluator, self.every, self.extra, self.say = evaluator, every, extra, say
        self.points: list[dict] = []
        self.start = time.perf_counter()

    def __call__(self, trainer, record) -> None:
        if trainer.step % self.every:
            return
        with trainer.ema_weights() as student:
            scores = self.evaluator.score(student)
        point = {"iteration": trainer.step, "wall_s": time.perf_counter() - self.start,
                 **{f"K={k}": v for k, v in scores.items()}}
        if self.extra is not None:
            point.update(self.extra(trainer, record))
        self.points.append(point)
        if self.say is not None:
            self.say(point)


def _rollouts(trainer, k: int, batches: int) -> list:
    from ..conditions import to_device

    out = []
    for _ in range(batches):
        cond = to_device(trainer.conditions(trainer.config.batch_size, trainer.rng), trainer.device)
        z = torch.randn((trainer.config.batch_size, *trainer.sample_shape), generator=trainer.rng).to(trainer.device)
        out.append([(trainer.rollout(z, cond, k), cond)])
    return out


def fake_lag(trainer, updates: int = 100, probe_batches: int = 8, seed: int = 12345) -> dict:
    """How far the fake score is behind the student it should model: its loss on fixed probe draws now,
    and after ``updates`` extra fake-score updates with the student frozen (then everything is restored).

    ``lag`` = loss now / loss after − 1: 0 when the fake score has converged for the current student.
    """
    import copy

    saved = {"fake": copy.deepcopy(trainer.fake_core.state_dict()), "opt": copy.deepcopy(trainer.opt_f.state_dict()),
             "sched": copy.deepcopy(trainer.sched_f.state_dict()), "rng": trainer.rng.get_state()}

    def probe() -> dict:
        # the trainer's own loss, exactly as training computes it, without a step
        trainer.rng.manual_seed(seed)
        return {k: float(sum(trainer.fake_score_loss(batch, k, backward=False) for batch in _rollouts(trainer, k, probe_batches))
                         / probe_batches) for k in trainer.config.steps}

    before = probe()
    trainer.rng.manual_seed(seed + 1)
    for i in range(updates):
        k = trainer.config.steps[i % len(trainer.config.steps)]
        trainer.fake_score_update(_rollouts(trainer, k, 1)[0], k)
    after = probe()
    trainer.fake_core.load_state_dict(saved["fake"])
    trainer.opt_f.load_state_dict(saved["opt"])
    trainer.sched_f.load_state_dict(saved["sched"])
    trainer.rng.set_state(saved["rng"])
    return {f"K={k}": {"loss": before[k], "converged": after[k], "lag": before[k] / after[k] - 1} for k in before}


# -- the suite -------------------------------------------------------------------------------------
MULTIPLIERS = (0.3, 1.0, 3.0)
STEPS = (1, 2, 4)


def suite_config(teacher_name: str, iterations: int, seed: int, lr_multiplier: float = 1.0, **recipe):
    """A user's config for a new teacher: only steps, cfg_scale, batch_size and iterations set (plus the
    recipe's own overrides, empty for the default), with the learning rates scaled by ``lr_multiplier``."""
    from ..config import TDMConfig
    from ..demos.teachers import TEACHERS

    config = TDMConfig(steps=STEPS, cfg_scale=TEACHERS[teacher_name].cfg_scale, batch_size=64, iterations=iterations,
                       seed=seed, **recipe)
    config.fake_lr *= lr_multiplier
    return config


_EVALUATORS: dict = {}


def run_curve(teacher_name: str, recipe_name: str, recipe: dict, lr_multiplier: float, seed: int, iterations: int,
              every: int, samples: int, threads: int | None = None, lag_every: int = 0, say=None) -> dict:
    """One distillation of a built-in teacher with its FID curve (a suite job; picklable arguments).

    ``lag_every``: also probe the fake score's lag (:func:`fake_lag`) at every such evaluation;
    ``say``: called with each point as it is recorded."""
    from ..demos.teachers import load_builtin_teacher
    from ..trainer import ClassConditions, TDMTrainer
    from ..demos.digits import IMAGE_SIZE, NUM_CLASSES

    if threads:
        torch.set_num_threads(threads)
    teacher = load_builtin_teacher(teacher_name)
    config = suite_config(teacher_name, iterations, seed, lr_multiplier, **recipe)
    key = (teacher_name, samples, config.cfg_scale)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = CurveEvaluator(teacher, config.cfg_scale, STEPS, samples=samples)
    evaluator = _EVALUATORS[key]
    def extra(trainer, record) -> dict:
        out = {"fake_loss": record["fake_loss"]}
        if lag_every and trainer.step % lag_every == 0:
            out["lag"] = fake_lag(trainer)
        return out

    recorder = CurveRecorder(evaluator, every, extra, say)
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (1, IMAGE_SIZE, IMAGE_SIZE), output_dir=None,
                         progress=False)
    with trainer.ema_weights() as student:
        start = {f"K={k}": v for k, v in evaluator.score(student).items()}
    recorder.points.append({"iteration": 0, "wall_s": 0.0, **start})
    trainer.train(callback=recorder)
    return {"teacher": teacher_name, "recipe": recipe_name, "lr_multiplier": lr_multiplier, "seed": seed,
            "config": config.to_dict(), "points": recorder.points, "floor": evaluator.floor,
            "teacher_fid_data": evaluator.teacher_fid_data,
            "baselines": {str(k): v for k, v in evaluator.baselines.items()}}


def verdicts(run: dict) -> dict:
    """The issue's pass/fail checks of one run, per K (see ``format_stability``)."""
    out = {}
    for k in STEPS:
        points = [(p["iteration"], p[f"K={k}"]) for p in run["points"] if p["iteration"] > 0]
        ratios = {it: p["ratio"] for it, p in points}
        fids = {it: p["fid_teacher"] for it, p in points}
        last = max(fids)
        checks = {}
        if run["lr_multiplier"] == 1.0:
            checks["ratio < 1 from 400"] = all(r < 1 for it, r in ratios.items() if it >= 400)
            if k in (2, 4):
                checks["ratio <= 0.5 from 600"] = all(r <= 0.5 for it, r in ratios.items() if it >= 600)
            checks["no drift (last <= 1.25 x best)"] = fids[last] <= 1.25 * min(fids.values())
        elif k in (2, 4):
            at = min(ratios, key=lambda it: abs(it - 1000))
            checks[f"ratio < 1 at {at}"] = ratios[at] < 1
        out[k] = checks
    return out


def _finished_runs(out_dir, every: int, samples: int) -> list[dict]:
    """The runs of a previous sweep in ``out_dir`` measured with the same evaluation settings."""
    import json
    from pathlib import Path

    path = Path(out_dir) / "stability.json"
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    if (previous.get("every"), previous.get("samples")) != (every, samples):
        return []
    return previous["runs"]


def _same_job(run: dict, job: tuple) -> bool:
    """Whether ``run`` measured ``job``: same teacher, recipe, multiplier and seed, and the config that
    job builds today (so that a run under other defaults or another iteration count is measured again)."""
    import json

    teacher, recipe_name, recipe, mult, seed, its = job[:6]
    config = json.loads(json.dumps(suite_config(teacher, its, seed, mult, **recipe).to_dict()))
    return (run["teacher"], run["recipe"], run["lr_multiplier"], run["seed"], run["config"]) == (teacher, recipe_name, mult, seed, config)


def run_stability(out_dir, teachers=None, recipes=None, multipliers=MULTIPLIERS, seeds=(0,), iterations: int = 2000,
                  every: int = 200, samples: int = 2000, workers: int | None = None, progress: bool = True,
                  resume: bool = False) -> dict:
    """Every built-in teacher × recipe × learning-rate multiplier × seed, in parallel processes (one
    thread each); writes ``stability.json``, ``stability.md`` and ``stability.png`` into ``out_dir``.

    Multipliers other than 1 run for the default recipe only, and only up to 1,000 iterations (their check is
    at 1,000); extra seeds run for multiplier 1 only. ``resume``: the runs that ``out_dir``'s
    ``stability.json`` already holds for a job of this sweep (same evaluation settings, same config) are
    kept instead of run again — a sweep of hours can be continued after a stop, or widened by seeds.
    """
    import json
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from pathlib import Path

    from ..demos.teachers import TEACHERS

    teachers = tuple(teachers or TEACHERS)
    recipes = recipes if recipes is not None else {"default": {}}
    # the most telling runs first, so that a sweep cut short still answers for every teacher
    jobs = []
    for tier in ("first seed", "other recipes", "lr multipliers", "more seeds"):
        for teacher in teachers:
            for recipe_name, recipe in recipes.items():
                for mult in multipliers if recipe_name == "default" else (1.0,):
                    for seed in seeds if mult == 1.0 else seeds[:1]:
                        kind = ("more seeds" if seed != seeds[0] else "lr multipliers" if mult != 1.0
                                else "first seed" if recipe_name == "default" else "other recipes")
                        if kind == tier:
                            its = iterations if mult == 1.0 else min(iterations, 1000)
                            jobs.append((teacher, recipe_name, recipe, mult, seed, its, every, samples, 1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _finished_runs(out_dir, every, samples) if resume else []
    kept = [next((r for r in previous if _same_job(r, job)), None) for job in jobs]
    runs = [run for run in kept if run is not None]
    todo = [job for job, run in zip(jobs, kept) if run is None]
    if progress and runs:
        print(f"resumed: {len(runs)} of {len(jobs)} runs kept from {out_dir / 'stability.json'}", flush=True)

    def record(run=None) -> dict:
        if run is not None:
            run["verdicts"] = verdicts(run)
            runs.append(run)
        runs.sort(key=lambda r: (teachers.index(r["teacher"]), list(recipes).index(r["recipe"]), r["lr_multiplier"], r["seed"]))
        results = {"iterations": iterations, "every": every, "samples": samples, "runs": runs,
                   "complete": len(runs) == len(jobs), "resumed_runs": len(jobs) - len(todo)}
        # written after every run: a sweep stopped early keeps what it measured
        (out_dir / "stability.json").write_text(json.dumps(results, indent=2))
        (out_dir / "stability.md").write_text(format_stability(results))
        return results

    results = record()
    if todo:
        workers = workers or max(1, min(len(todo), len(os.sched_getaffinity(0))))
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(run_curve, *job) for job in todo]
            for future in as_completed(futures):
                run = future.result()
                results = record(run)
                if progress:
                    print(f"[{len(runs)}/{len(jobs)}] {run['teacher']} {run['recipe']} lr x{run['lr_multiplier']} "
                          f"seed {run['seed']}", flush=True)
    plot_stability(results, out_dir / "stability.png")
    return results


def format_stability(results: dict) -> str:
    """Markdown: FID ratio to the best NFE-matched baseline at every evaluation, and the checks."""
    import statistics

    lines = [f"FID to teacher-50 over the best NFE-matched baseline's (< 1: the student wins), {results['samples']} "
             f"samples, every {results['every']} iterations, EMA weights; `floor`: the teacher-50 against itself from "
             "other noise, in the same units (no student can be told apart below it)."
             + ("" if results.get("complete", True) else " **The sweep was stopped early: only the runs listed finished.**"), ""]
    groups: dict = {}
    for run in results["runs"]:
        groups.setdefault((run["teacher"], run["recipe"], run["lr_multiplier"]), []).append(run)
    iterations = sorted({p["iteration"] for r in results["runs"] for p in r["points"] if p["iteration"] > 0})
    lines += ["| teacher | recipe | lr × | K | floor | seeds | " + " | ".join(str(i) for i in iterations) + " | checks |",
              "|---|---|---|---|---|---|" + "---|" * len(iterations) + "---|"]
    for (teacher, recipe, mult), runs in groups.items():
        for k in STEPS:
            cells = []
            for it in iterations:
                values = [p[f"K={k}"]["ratio"] for r in runs for p in r["points"] if p["iteration"] == it]
                if not values:
                    cells.append("")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.2f}")
                else:
                    cells.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}")
            checks = {}
            for r in runs:  # recomputed: a JSON round trip turns the stored verdicts' K keys into strings
                for name, ok in verdicts(r)[k].items():
                    checks[name] = checks.get(name, True) and ok
            check_text = "; ".join(f"{name}: {'pass' if ok else '**FAIL**'}" for name, ok in checks.items())
            floor = runs[0]["floor"] / runs[0]["baselines"][str(k)]["fid_teacher"]
            lines.append(f"| {teacher} | {recipe} | {mult:g} | {k} | {floor:.2f} | {len(runs)} | " + " | ".join(cells)
                         + f" | {check_text} |")
    failed = sum(not ok for r in results["runs"] for k in STEPS for ok in verdicts(r)[k].values())
    total = sum(len(verdicts(r)[k]) for r in results["runs"] for k in STEPS)
    lines += ["", f"Checks passed: {total - failed} of {total}."]
    return "\n".join(lines)


def plot_stability(results: dict, path) -> None:
    """One panel per teacher: ratio-vs-iteration lines per K and recipe/lr multiplier (mean of seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(dict.fromkeys(r["teacher"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(teachers), figsize=(5 * len(teachers), 4), squeeze=False)
    colours = {1: "tab:red", 2: "tab:orange", 4: "tab:blue"}
    for ax, teacher in zip(axes[0], teachers):
        groups: dict = {}
        for run in (r for r in results["runs"] if r["teacher"] == teacher):
            groups.setdefault((run["recipe"], run["lr_multiplier"]), []).append(run)
        for (recipe, mult), runs in groups.items():
            style = "-" if recipe == "default" and mult == 1.0 else (":" if recipe == "default" else "--")
            for k in STEPS:
                its = [p["iteration"] for p in runs[0]["points"]]
                mean = [sum(r["points"][i][f"K={k}"]["ratio"] for r in runs) / len(runs) for i in range(len(its))]
                ax.plot(its, mean, style, color=colours[k], alpha=1.0 if mult == 1.0 else 0.5,
                        label=f"K={k} {recipe}" + ("" if mult == 1.0 else f" lr×{mult:g}"))
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(teacher)
        ax.set_xlabel("iteration")
        ax.set_ylabel("FID ratio to best NFE-matched baseline")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_point(point: dict) -> str:
    """One line per evaluation: FID to teacher-50 / ratio / diversity at each K (and the fake score's lag)."""
    text = f"{point['iteration']:>5}  " + "  ".join(
        f"K={k}: FID {point[f'K={k}']['fid_teacher']:.3f} ratio {point[f'K={k}']['ratio']:.2f} "
        f"div {point[f'K={k}']['diversity']:.2f} data {point[f'K={k}']['fid_data']:.2f} "
        f"pair {point[f'K={k}'].get('paired_rmse', float('nan')):.3f}" for k in STEPS)
    if "lag" in point:
        text += "  lag " + " ".join(f"{k} {v['lag']:.3f}" for k, v in point["lag"].items())
    return text


def factor_recipe(recipe: str, overrides: dict) -> dict:
    """The settings of one factor run: ``recipe`` (default: TDMConfig's, paper: PAPER_FAITHFUL, early-stop: the
    former digits demo's, as overrides of the suite's config) with ``overrides`` on top."""
    from ..config import PAPER_FAITHFUL
    from ..demos.demo_digits import early_stop_config

    settings = {"default": {}, "paper": dict(PAPER_FAITHFUL)}.get(recipe)
    if settings is None:
        former = early_stop_config().to_dict()
        settings = {k: former[k] for k in ("fake_lr", "generator_lr_ratio", "warmup_steps", "ema_decay", "normalize", "lr_decay",
                                           "tau_min_sigma")}
    return {**settings, **overrides}


def main(argv=None) -> None:
    """``python -m tdm_fast.eval.stability``: one FID curve of a built-in teacher under a recipe with any
    setting changed (the factor runs of docs/stability.md)."""
    import argparse
    import json

    from ..config import PAPER_FAITHFUL
    from ..demos.teachers import TEACHERS

    parser = argparse.ArgumentParser(prog="python -m tdm_fast.eval.stability", description=main.__doc__)
    parser.add_argument("--teacher", choices=list(TEACHERS), default="digits")
    parser.add_argument("--recipe", choices=["default", "paper", "early-stop"], default="default",
                        help="TDMConfig defaults, PAPER_FAITHFUL, or the former digits demo recipe (early_stop_config)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="config overrides, e.g. normalize=false")
    parser.add_argument("--lr-multiplier", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--lag-every", type=int, default=0, help="probe the fake score's lag at these evaluations")
    parser.add_argument("--json", default=None, help="write the run here")
    parser.add_argument("--suite", default=None, metavar="OUT",
                        help="instead: the whole sweep (every teacher, default and paper recipes, lr x 0.3/1/3) into OUT")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of the sweep")
    parser.add_argument("--resume", action="store_true",
                        help="with --suite: keep the runs OUT/stability.json already holds for this sweep")
    args = parser.parse_args(argv)
    if args.suite:
        run_stability(args.suite, recipes={"default": {}, "paper": dict(PAPER_FAITHFUL)}, seeds=tuple(args.seeds),
                      iterations=args.iterations, every=args.every, samples=args.samples, resume=args.resume)
        print(Path(args.suite, "stability.md").read_text())
        return
    overrides = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    run = run_curve(args.teacher, args.recipe, factor_recipe(args.recipe, overrides), args.lr_multiplier, args.seed,
                    args.iterations, args.every, args.samples, lag_every=args.lag_every,
                    say=lambda p: print(format_point(p), flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()

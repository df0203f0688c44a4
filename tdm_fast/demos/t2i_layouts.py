"""The role layouts agree (issue 13 item 3): the demo's run with LoRA roles (student and fake score as two
adapters on one base), ``--fake-copy`` (the fake score's adapter on its own base copy) and
``--full-finetune`` (student and fake as full copies of the teacher), over several training seeds.

They are three implementations of one algorithm, so their FIDs must agree within the seed spread.
Every run is built by ``tdm-fast distill --preset`` 's own code with the demo's recipe; students are
scored by the engine's sampler (:func:`~tdm_fast.sampling.sample_student`, which the stock pipeline
reproduces to < 1e-3, see ``pipeline_parity``) and the folder's VAE, on the demo's prompts and latents,
as FID to the teacher's 50-step CFG samples. A full fine-tune has no LoRA for the stock pipeline to
load, hence the one sampler for all three.

``python -m tdm_fast.demos.t2i_layouts --pipeline sd15 --iterations 300 --seeds 0 1 2 --out runs/layouts-sd15``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from . import t2i
from .t2i_demo import CFG, cached_reference, demo_config, load_stock, preset_run

LAYOUTS = {"lora-roles": {}, "fake-copy": {"fake_copy": True}, "full-finetune": {"full_finetune": True}}


class EngineScorer:
    """``scorer(student, k, total_steps, solver) -> metrics`` on the demo's prompts and latents: FID to the
    teacher's 50-step CFG samples, FID to the data and class accuracy of the student's samples, drawn by
    the engine's sampler and decoded by the folder's VAE. ``reference8``: the teacher's pooled reference
    samples when the caller has them (e.g. from :func:`~tdm_fast.demos.t2i_demo.evaluate_pipelines`)."""

    @torch.no_grad()
    def __init__(self, pipeline: str, model_dir: Path, samples: int, seed: int = 0, reference_steps: int = 50,
                 reference8: torch.Tensor | None = None):
        from ..eval.digits import DigitsMetrics
        from ..export.vae import LatentDecoder, load_vae

        self.pipeline, self.samples, self.seed, self.reference_steps = pipeline, samples, seed, reference_steps
        prompts, self.labels, self.latents = t2i.eval_prompts(samples, seed)
        self.teacher = load_stock(model_dir)
        if reference8 is None:
            cached = cached_reference(pipeline, self.teacher, samples, seed, reference_steps, CFG[pipeline])
            reference8 = cached[0] if cached is not None else t2i.to_digits8(
                t2i.generate(self.teacher, prompts, self.latents, reference_steps, CFG[pipeline]))
        cond = t2i.encode_prompts(self.teacher, prompts)
        self.cond = cond["encoder_hidden_states"] if pipeline == "sd15" else cond
        self.decoder = LatentDecoder(load_vae(model_dir)).eval()
        self.metrics = DigitsMetrics()
        self.reference_features = self.metrics.features(reference8)

    def score_images(self, images8: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        row = self.metrics(images8, self.labels if labels is None else labels, self.reference_features)
        row.pop("features")
        return row

    @torch.no_grad()
    def __call__(self, student, k: int, total_steps: int, solver: str = "ddim") -> dict:
        from ..sampling import sample_student

        x0 = sample_student(student, self.latents.clone(), self.cond, k, total_steps, solver=solver)
        return self.score_images(t2i.to_digits8(self.decoder(x0) * 2 - 1))

    @torch.no_grad()
    def floor(self) -> float:
        """The measure's resolution: the teacher's 50-step CFG samples from other prompts and latents
        (seed + 1), scored against the reference. Differences of students near it are not resolved."""
        prompts, labels, latents = t2i.eval_prompts(self.samples, self.seed + 1)
        images = t2i.generate(self.teacher, prompts, latents, self.reference_steps, CFG[self.pipeline])
        return self.score_images(t2i.to_digits8(images), labels)["fid_teacher"]


def train_layout(pipeline: str, model_dir: Path, work: Path, layout: str, seed: int, iterations: int, **overrides):
    """The trained student of one layout and seed (the demo's recipe, with ``overrides`` of its
    TDMConfig, and LoRA) and its wall clock."""
    from ..backbones.run import build_preset_run
    from ..trainer import TDMTrainer

    torch.manual_seed(seed)
    run = preset_run(pipeline, model_dir, t2i.write_prompt_file(work / "prompts.txt"), work / "embeddings", **LAYOUTS[layout])
    config = demo_config(pipeline, iterations, seed=seed, **overrides)
    teacher, student, fake, conditions, shape = build_preset_run(run, config)
    trainer = TDMTrainer(teacher, config, conditions, shape, output_dir=None, student=student, fake=fake, progress=False)
    start = time.perf_counter()
    trainer.train()
    return trainer.final_student().eval(), config, time.perf_counter() - start


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict, steps) -> dict:
    """Mean and std over seeds of each layout's FID per K, and the acceptance check at K = 4 (every pair of
    layouts within the larger of their seed stds)."""
    table = {layout: {f"K={k}": _mean_std([r[f"K={k}"]["fid_teacher"] for r in by_seed.values()]) for k in steps}
             for layout, by_seed in runs.items()}
    k = f"K={max(steps)}"
    names = list(table)
    agree = all(abs(table[a][k][0] - table[b][k][0]) <= max(table[a][k][1], table[b][k][1])
                for i, a in enumerate(names) for b in names[i + 1:])
    return {"table": table, f"{k} layouts within the larger seed std": agree}


def markdown(summary: dict, runs: dict, steps, iterations: int, samples: int) -> str:
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    lines = [f"FID to teacher-50 ({samples} samples), mean ± std over training seeds {seeds}, {iterations} iterations each:", "",
             "| layout | " + " | ".join(f"K={k}" for k in sorted(steps, reverse=True)) + " | per seed (K=4) |",
             "|---|" + "---|" * (len(steps) + 1)]
    for layout, row in summary["table"].items():
        per_seed = ", ".join(f"{runs[layout][s][f'K={max(steps)}']['fid_teacher']:.3f}" for s in sorted(runs[layout]))
        lines.append(f"| {layout} | " + " | ".join(f"{row[f'K={k}'][0]:.3f} ± {row[f'K={k}'][1]:.3f}" for k in sorted(steps, reverse=True))
                     + f" | {per_seed} |")
    key = next(k for k in summary if k != "table")
    lines += ["", f"{key}: {'yes' if summary[key] else 'NO'}"]
    return "\n".join(lines)


def run_layouts(pipeline: str, out: Path, seeds=(0, 1, 2), iterations: int = 300, samples: int = 2000, layouts=tuple(LAYOUTS),
                say=print, **overrides) -> dict:
    """Trains and scores every layout for every seed with the demo's recipe (``overrides``: TDMConfig fields
    changed for every run); writes ``layouts.json`` after each run and ``layouts.md`` at the end."""
    out.mkdir(parents=True, exist_ok=True)
    model_dir = t2i.shipped_pipeline(pipeline)
    score = EngineScorer(pipeline, model_dir, samples)
    runs: dict = {layout: {} for layout in layouts}
    steps = None
    for layout in layouts:
        for seed in seeds:
            student, config, train_s = train_layout(pipeline, model_dir, out, layout, seed, iterations, **overrides)
            steps = config.steps
            row = {f"K={k}": score(student, k, config.total_steps) for k in steps}
            runs[layout][seed] = {**row, "train_s": train_s}
            say(f"{layout} seed {seed}: " + ", ".join(f"{k} FID {v['fid_teacher']:.3f}" for k, v in row.items())
                + f" ({train_s:.0f} s)")
            (out / "layouts.json").write_text(json.dumps({"iterations": iterations, "samples": samples, "overrides": overrides, "runs": runs}, indent=2))
    summary = summarise(runs, steps)
    result = {"pipeline": pipeline, "iterations": iterations, "samples": samples, "overrides": overrides, "runs": runs, **summary}
    (out / "layouts.json").write_text(json.dumps(result, indent=2))
    changed = f"\n\nThe demo's recipe with {overrides}." if overrides else ""
    (out / "layouts.md").write_text(markdown(summary, runs, steps, iterations, samples) + changed + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdm_fast.demos.t2i_layouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", choices=t2i.PIPELINES, default="sd15")
    parser.add_argument("--out", default=None, help="default runs/layouts-<pipeline>")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="recipe overrides, e.g. fake_lr=3e-4")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/layouts-{args.pipeline}")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item}: give FIELD=JSON, e.g. fake_lr=3e-4")
    try:  # before anything is trained or written
        demo_config(args.pipeline, args.iterations, **overrides)
    except (TypeError, ValueError) as exc:
        parser.error(f"--set: {exc}")
    run_layouts(args.pipeline, out, tuple(args.seeds), args.iterations, args.samples, tuple(args.layouts), **overrides)
    print((out / "layouts.md").read_text())


if __name__ == "__main__":
    main()

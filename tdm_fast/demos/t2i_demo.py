"""``tdm-fast demo --pipeline sd15|sd3``: distil a shipped text-to-image pipeline of stock diffusers
classes (:mod:`tdm_fast.demos.t2i`) through the user's path, and judge it through the stock pipeline.

The path is exactly what ``tdm-fast distill --preset sd15|sd3 --model DIR --prompts FILE`` runs:
:func:`~tdm_fast.backbones.run.build_preset_run` (the teacher from the folder's denoiser and scheduler
config, prompt embeddings computed by the pipeline's own ``encode_prompt`` and cached, student and
fake score as two LoRA adapters on one shared base, the teacher = adapters off, the K embedding on
the timestep embedding), :class:`~tdm_fast.trainer.TDMTrainer` with a unify student K ∈ {1, 2, 4},
and :func:`~tdm_fast.backbones.run.export_preset_student` (diffusers LoRA + K-embedding table).

Sampling is done by the stock pipeline only: ``pipe.scheduler = TDMScheduler.from_config(...)``,
``pipe.load_lora_weights(run/lora)``, ``apply_steps_embedding(pipe.unet | pipe.transformer, run/lora,
steps=K)``, ``guidance_scale=1``, VAE decoding. Every NFE-matched baseline of spec §9 runs through the
same stock pipeline with the teacher's weights:

- ``*{K}-student-times``: deterministic DDIM (VP) / Euler (flow, the same update) at the student's
  own times t_i — ``TDMScheduler`` on the teacher, no CFG;
- ``*{K}-trailing``: K steps at trailing spacing t = T-1, T-1-T/K, ..., no CFG — SD1.5: the stock
  ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)`` (so its last step returns x̂0);
  SD3: Euler at σ = shift(t/T) of those t (``TDMScheduler`` with T' = T);
- SD3 also ``euler{K}-stock``: the shipped ``FlowMatchEulerDiscreteScheduler`` at K steps (σ from 1 to
  1/T, last step to σ = 0), what a user gets by lowering ``num_inference_steps``;
- for K ≥ 2 both of these at K/2 steps with CFG (two evaluations a step).

Scores (:class:`tdm_fast.eval.digits.DigitsMetrics`, on the pipeline images pooled to 8×8): FID on the
digits classifier's features to the teacher's 50-step CFG samples of the same prompts and initial
latents, FID to the real digits, class accuracy, coverage, diversity. ``metrics.json`` has the digits
demo's shape (``comparisons["K=k"]["fid_ratio"]`` = student FID / best baseline FID, ``acceptance``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..config import TDMConfig
from . import t2i
from .demo_digits import jsonable

CFG = {"sd15": t2i.SD15_CFG, "sd3": t2i.SD3_CFG}
# The demo's only settings of its own: the run's size (a CPU's worth). Everything else is what
# `distill --preset` gives with no recipe flags (tdm_fast.recipes, the LoRA defaults of tdm_fast.lora).
SIZES = {"sd15": {"batch_size": 32, "iterations": 1000}, "sd3": {"batch_size": 64, "iterations": 500}}
DEMO_ITERATIONS = {k: v["iterations"] for k, v in SIZES.items()}


def demo_config(pipeline: str, iterations: int | None = None, seed: int = 0, model: str | Path | None = None,
                **overrides) -> TDMConfig:
    """``distill --preset``'s defaults for ``pipeline`` (of the folder ``model``, default the shipped one) with
    unify K ∈ {1, 2, 4} at the demo's size; ``overrides`` (ablations) replace single settings."""
    from ..recipes import preset_config

    settings = {**SIZES[pipeline], "steps": (1, 2, 4), "seed": seed, **overrides}
    if iterations:
        settings["iterations"] = iterations
    return preset_config(pipeline, model or t2i.shipped_pipeline(pipeline), **settings)


def lora_defaults(pipeline: str) -> tuple[int, str]:
    """The LoRA rank and targets ``distill --preset`` gives ``pipeline``'s backbone."""
    from ..backbones.presets import get_preset
    from ..lora import DEFAULT_RANK, DEFAULT_TARGETS

    backbone = get_preset(pipeline).backbone
    return DEFAULT_RANK[backbone], ",".join(DEFAULT_TARGETS[backbone])


def preset_argv(pipeline: str, model: Path, prompts: Path, cache: Path | str, rank: int | None = None,
                targets: str | None = None, fake_copy: bool = False, full_finetune: bool = False,
                config: TDMConfig | None = None) -> list[str]:
    """The ``tdm-fast distill`` flags of this run (what a user would type); with ``config``, its K and every
    setting of it that differs from what ``distill --preset`` gives by default (the demo: its size)."""
    argv = ["--preset", pipeline, "--model", str(model), "--prompts", str(prompts), "--resolution", str(t2i.IMAGE_SIZE),
            "--embedding-cache", str(cache)]
    if config is not None:
        argv += ["--steps", *map(str, config.steps), *changed_settings_argv(pipeline, config, model)]
    if pipeline == "sd3":
        argv += ["--max-sequence-length", str(t2i.T5_LENGTH)]
    if rank is not None:
        argv += ["--lora-rank", str(rank)]
    if targets:
        argv += ["--lora-targets", targets]
    if fake_copy:
        argv.append("--fake-copy")
    if full_finetune:
        argv.append("--full-finetune")
    return argv


def changed_settings_argv(pipeline: str, config: TDMConfig, model: str | Path | None = None) -> list[str]:
    """The flags that set ``config`` apart from ``distill --preset PIPELINE --model MODEL --steps …``'s defaults."""
    from ..recipes import preset_config

    default = preset_config(pipeline, model or t2i.shipped_pipeline(pipeline), steps=config.steps).to_dict()
    argv = []
    for key, value in config.to_dict().items():
        if key == "steps" or value == default.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    return argv


def preset_run(pipeline: str, model: Path, prompts: Path, cache: Path | str, rank: int | None = None,
               targets: str | None = None, fake_copy: bool = False, full_finetune: bool = False):
    """The same run as :func:`preset_argv`'s flags, as the values :func:`~tdm_fast.backbones.run.build_preset_run` takes."""
    from ..backbones.run import PresetRun

    return PresetRun(preset=pipeline, model=model, prompts=prompts, resolution=t2i.IMAGE_SIZE, embedding_cache=cache,
                     max_sequence_length=t2i.T5_LENGTH if pipeline == "sd3" else None, lora_rank=rank,
                     lora_targets=targets, fake_copy=fake_copy, full_finetune=full_finetune)


# -- the stock samplers --------------------------------------------------------------------------
def _scheduler(pipe, kind: str, total_steps: int = 900):
    """A scheduler for ``pipe`` from its shipped config: 'stock' (as shipped), 'tdm' (the student's
    times), 'trailing' (the stock scheduler at trailing spacing)."""
    import diffusers

    from ..scheduler import TDMScheduler

    config = pipe._tdm_base_scheduler_config
    if kind == "stock":
        return type(pipe._tdm_base_scheduler).from_config(config)
    if kind == "tdm":
        return TDMScheduler.from_config(config, total_steps=total_steps)
    if kind == "trailing":
        if isinstance(pipe, diffusers.StableDiffusion3Pipeline):
            # σ at t = T-1, T-1-T/K, ... (shifted): the flow version of DDIM's trailing spacing; the Euler
            # step of a flow model is the deterministic DDIM jump, which TDMScheduler makes
            return TDMScheduler.from_config(config, total_steps=int(config.get("num_train_timesteps", 1000)))
        return diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)
    raise ValueError(kind)


def teacher_samplers(pipeline: str, steps: int, cfg_scale: float) -> list[dict]:
    """The NFE-matched candidates of spec §9 for a K-step student, as stock-pipeline settings."""
    step = "euler" if pipeline == "sd3" else "ddim"
    spacings = ["student-times", "trailing"] + (["stock"] if pipeline == "sd3" else [])
    kinds = {"student-times": "tdm", "trailing": "trailing", "stock": "stock"}
    out = [{"name": f"{step}{steps}-{sp}", "scheduler": kinds[sp], "steps": steps, "guidance": 1.0, "nfe": steps} for sp in spacings]
    if steps >= 2:
        half = steps // 2
        out += [{"name": f"{step}{half}-cfg-{sp}", "scheduler": kinds[sp], "steps": half, "guidance": cfg_scale, "nfe": 2 * half}
                for sp in spacings]
    return out


def load_stock(model_dir: Path):
    pipe = t2i.load_pipeline(model_dir)
    pipe._tdm_base_scheduler = pipe.scheduler
    pipe._tdm_base_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def load_student_pipeline(model_dir: Path, lora_dir: Path, steps: int, total_steps: int = 900):
    """The user's sampling path: stock pipeline + TDMScheduler + LoRA + the K embedding folded in."""
    from ..lora import STEPS_EMBEDDING_FILE, apply_steps_embedding
    from ..scheduler import TDMScheduler

    pipe = t2i.load_pipeline(model_dir)
    pipe.scheduler = TDMScheduler.from_config(pipe.scheduler.config, total_steps=total_steps)
    pipe.load_lora_weights(str(lora_dir))
    if (Path(lora_dir) / STEPS_EMBEDDING_FILE).is_file():
        apply_steps_embedding(pipe.unet if hasattr(pipe, "unet") else pipe.transformer, lora_dir, steps=steps)
    return pipe


@torch.no_grad()
def pipeline_parity(pipeline: str, model_dir: Path, lora_dir: Path, student, steps: int, total_steps: int = 900,
                    samples: int = 8, seed: int = 0) -> float:
    """Max |Δ| between the stock pipeline's latents (``load_student_pipeline``) and the engine's
    :func:`~tdm_fast.sampling.sample_student` of the trained ``student`` on the same prompts and noise."""
    from ..sampling import sample_student

    prompts, _, latents = t2i.eval_prompts(samples, seed)
    pipe = load_student_pipeline(model_dir, lora_dir, steps, total_steps)
    piped = t2i.generate(pipe, prompts, latents, steps, 1.0, output_type="latent")
    cond = t2i.encode_prompts(pipe, prompts)
    cond = cond["encoder_hidden_states"] if pipeline == "sd15" else cond
    ours = sample_student(student, latents.clone(), cond, steps, total_steps)
    return float((piped - ours).abs().max())


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- the teacher's 50-step reference (cached in the package for the shipped pipelines) -----------
REFERENCE_DIR = t2i.T2I_ASSETS / "reference"


def _reference_meta(pipeline: str, samples: int, seed: int, steps: int, cfg_scale: float) -> dict:
    return {"pipeline": pipeline, "samples": samples, "seed": seed, "steps": steps, "cfg_scale": cfg_scale,
            "prompts": "tdm_fast.demos.t2i.eval_prompts", "pooled": "2x2 average, 16x16 -> 8x8, [-1, 1]"}


def write_reference_cache(pipeline: str, samples: int = 2000, seed: int = 0, steps: int = 50, cfg_scale: float | None = None,
                          model_dir: str | Path | None = None, folder: str | Path | None = None) -> Path:
    """Computes the teacher's ``steps``-step CFG samples of :func:`tdm_fast.demos.t2i.eval_prompts`
    through the stock pipeline and stores them pooled to 8×8 (what the metrics read):
    ``<folder>/<pipeline>.safetensors`` + ``.json`` (default folder: the package's)."""
    from safetensors.torch import save_file

    cfg_scale = CFG[pipeline] if cfg_scale is None else cfg_scale
    folder = Path(folder) if folder is not None else REFERENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_stock(Path(model_dir) if model_dir is not None else t2i.shipped_pipeline(pipeline))
    prompts, _, latents = t2i.eval_prompts(samples, seed)
    images = t2i.generate(pipe, prompts, latents, steps, cfg_scale)
    save_file({"images": t2i.to_digits8(images).contiguous()}, str(folder / f"{pipeline}.safetensors"))
    (folder / f"{pipeline}.json").write_text(json.dumps(_reference_meta(pipeline, samples, seed, steps, cfg_scale), indent=2))
    return folder / f"{pipeline}.safetensors"


def cached_reference(pipeline: str, teacher, samples: int, seed: int, steps: int, cfg_scale: float, check: int = 100,
                     folder: str | Path | None = None):
    """``(pooled images, first `check` images at full size)`` from the cache, or None.

    Used only if the settings match and the given teacher pipeline reproduces the first ``check``
    samples (max |Δ| ≤ 1e-3 after pooling), so another teacher never hits the cache."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else REFERENCE_DIR
    meta_file = folder / f"{pipeline}.json"
    if not meta_file.is_file():
        return None
    if json.loads(meta_file.read_text()) != _reference_meta(pipeline, samples, seed, steps, cfg_scale):
        return None
    images = load_file(str(folder / f"{pipeline}.safetensors"))["images"]
    prompts, _, latents = t2i.eval_prompts(samples, seed)
    n = min(check, samples)
    fresh = t2i.generate(teacher, prompts[:n], latents[:n], steps, cfg_scale)
    if (t2i.to_digits8(fresh) - images[:n]).abs().max() > 1e-3:
        return None
    return images, fresh


@torch.no_grad()
def evaluate_pipelines(pipeline: str, model_dir: Path, lora_dir: Path | None, steps=(1, 2, 4), cfg_scale: float | None = None,
                       samples: int = 2000, seed: int = 0, reference_steps: int = 50, total_steps: int = 900, bootstrap: int = 0,
                       keep_images: int = 0, say=None, metrics=None, use_cache: bool = True) -> dict:
    """Scores the teacher's reference, each student K (``lora_dir`` None: skip) and every NFE-matched
    baseline through the stock pipeline; returns the digits demo's results dict (``samplers``,
    ``comparisons``, ...). With ``use_cache`` the teacher's reference samples come from the package's
    cache when it matches (see :func:`cached_reference`)."""
    from ..eval.digits import DigitsMetrics

    say = say or (lambda _m: None)
    cfg_scale = CFG[pipeline] if cfg_scale is None else cfg_scale
    metrics = metrics or DigitsMetrics(bootstrap=bootstrap)
    prompts, labels, latents = t2i.eval_prompts(samples, seed)
    teacher = load_stock(model_dir)
    rows, images = {}, {}

    def score(name, imgs8, nfe, elapsed, ref_feats, full=None):
        row = metrics(imgs8, labels, ref_feats)
        feats = row.pop("features")
        rows[name] = {"nfe": nfe, **row, "ms_per_image": 1000 * elapsed / samples}
        if keep_images:
            images[name] = full[:keep_images]
        return feats

    ref_name = f"teacher-{reference_steps}"
    teacher.scheduler = _scheduler(teacher, "stock")
    start = time.perf_counter()
    cached = cached_reference(pipeline, teacher, samples, seed, reference_steps, cfg_scale) if use_cache else None
    if cached is not None:
        reference8, reference_full = cached
        elapsed = (time.perf_counter() - start) * samples / min(100, samples)  # the check's throughput
        say(f"{ref_name}: from the package's cache (first {min(100, samples)} samples recomputed and matched)")
    else:
        reference_full = t2i.generate(teacher, prompts, latents, reference_steps, cfg_scale)
        reference8 = t2i.to_digits8(reference_full)
        elapsed = time.perf_counter() - start
    ref_feats = score(ref_name, reference8, 2 * reference_steps, elapsed, None, reference_full)
    rows[ref_name]["fid_teacher"] = 0.0
    say(f"{ref_name}: accuracy {rows[ref_name]['accuracy']:.3f}")
    candidates: dict[int, list[str]] = {}
    for k in sorted(steps):
        candidates[k] = []
        for s in teacher_samplers(pipeline, k, cfg_scale):
            candidates[k].append(s["name"])
            if s["name"] in rows:
                continue
            teacher.scheduler = _scheduler(teacher, s["scheduler"], total_steps)
            out, elapsed = _timed(lambda: t2i.generate(teacher, prompts, latents, s["steps"], s["guidance"]))
            score(s["name"], t2i.to_digits8(out), s["nfe"], elapsed, ref_feats, out)
            say(f"{s['name']}: FID to teacher-50 {rows[s['name']]['fid_teacher']:.3f}")
    if lora_dir is not None:
        for k in sorted(steps):
            pipe = load_student_pipeline(model_dir, lora_dir, k, total_steps)
            out, elapsed = _timed(lambda: t2i.generate(pipe, prompts, latents, k, 1.0))
            score(f"tdm-{k}", t2i.to_digits8(out), k, elapsed, ref_feats, out)
            say(f"tdm-{k}: FID to teacher-50 {rows[f'tdm-{k}']['fid_teacher']:.3f}, accuracy {rows[f'tdm-{k}']['accuracy']:.3f}")
    results = {"samples": samples, "seeds": [seed], "cfg_scale": cfg_scale, "reference": ref_name, "samplers": rows,
               "comparisons": {}, "reference_cached": cached is not None}
    for k, names in candidates.items():
        best = min(names, key=lambda n: rows[n]["fid_teacher"])
        entry = {"baseline": best, "candidates": names, "baseline_fid": rows[best]["fid_teacher"]}
        if f"tdm-{k}" in rows:
            tdm = rows[f"tdm-{k}"]
            entry.update(tdm=f"tdm-{k}", fid_ratio=tdm["fid_teacher"] / max(rows[best]["fid_teacher"], 1e-12),
                         accuracy_gap_to_teacher=tdm["accuracy"] - rows[ref_name]["accuracy"])
        results["comparisons"][f"K={k}"] = entry
    if keep_images:
        results["images"] = images
    results["reference_images8"] = reference8
    return results


# -- the demo ------------------------------------------------------------------------------------
@torch.no_grad()
def _teacher_probe(teacher, conditions, shape) -> torch.Tensor:
    """Teacher outputs (conditional and unconditional x̂0) on fixed inputs at three times."""
    g = torch.Generator().manual_seed(123)
    cond = conditions(4, torch.Generator().manual_seed(7))
    x = torch.randn((4, *shape), generator=g)
    outs = []
    for t in (100, 500, 900):
        (c, _), (u, _) = teacher.cond_uncond(x, t, cond)
        outs += [c, u]
    return torch.stack(outs)


def scoring_lengths(config: TDMConfig, score_at=()) -> list[int]:
    """The iterations at which a run of ``config`` is scored: ``score_at`` and its end, in order. The student at an
    earlier length stands for a run of that length only where the rates do not depend on the run's length."""
    lengths = sorted({int(n) for n in score_at} | {config.iterations})
    if lengths[0] < 1 or lengths[-1] != config.iterations:
        raise ValueError(f"score_at must lie in 1..{config.iterations} (the run's iterations), got {sorted(score_at)}")
    if len(lengths) > 1 and config.lr_decay != "constant":
        raise ValueError(f"score_at needs constant rates after warm-up (lr_decay 'constant', not {config.lr_decay!r}): "
                         "otherwise the student at an earlier iteration is not what a run of that length trains")
    return lengths


def _distil(pipeline: str, model_dir: Path, run, config: TDMConfig, out_dir: Path, progress: bool, lengths: list[int]):
    """Trains the student of ``run`` and yields, at each of ``lengths``, (iterations, student, training seconds so far,
    whether the teacher role's outputs are unchanged by training, whether they equal the folder's own model loaded
    afresh), with the log so far in ``train_log.jsonl`` of that length's folder. Before the end the student is the
    EMA weights swapped in for the caller's use and the global RNG is restored afterwards, so the run goes on as if
    it had not been looked at."""
    from ..backbones.presets import load_teacher
    from ..backbones.run import build_preset_run
    from ..trainer import TDMTrainer

    teacher, student, fake, conditions, shape = build_preset_run(run, config)
    probe_before = _teacher_probe(teacher, conditions, shape)
    trainer = TDMTrainer(teacher, config, conditions, shape, output_dir=None, student=student, fake=fake, progress=progress)
    base, _ = load_teacher(pipeline, model_dir)
    base.null_cond = teacher.null_cond
    base_probe = _teacher_probe(base, conditions, shape)
    history, train_s = [], 0.0
    for n in lengths:
        more, seconds = _timed(lambda: trainer.train(n))
        history += more
        train_s += seconds
        folder = length_folder(out_dir, n, config.iterations)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train_log.jsonl", "w") as f:
            for record in history:
                f.write(json.dumps(record) + "\n")
        probe_after = _teacher_probe(teacher, conditions, shape)
        # the teacher role (adapters off, K-embedding hooks silent) computes exactly the folder's own model
        checks = bool(torch.equal(probe_before, probe_after)), bool(torch.equal(probe_after, base_probe))
        if n == config.iterations:
            yield n, trainer.final_student().eval(), train_s, *checks
            return
        with trainer.ema_weights() as student, torch.random.fork_rng():
            training = student.training
            yield n, student.eval(), train_s, *checks
            student.train(training)


def length_folder(out_dir: Path, iterations: int, last: int) -> Path:
    """Where a run's scores at ``iterations`` go: the run's folder at its end, ``iterations-<n>/`` before it."""
    return out_dir if iterations == last else out_dir / f"iterations-{iterations}"


def _onnx_parity(results: dict, pipeline: str, model_dir: Path, student, out_dir: Path, config: TDMConfig, samples: int,
                 eval_seed: int, reference8: torch.Tensor, bootstrap: int, exporter: str, say) -> list[str]:
    """Exports the student to ``onnx/`` and scores its ONNX Runtime samples against torch's (into ``results``);
    returns the section of metrics.md."""
    from ..eval.digits import DigitsMetrics
    from . import t2i_onnx

    argv = t2i_onnx.export_argv(out_dir / "student", model_dir, out_dir / "onnx", config.steps, config.total_steps, exporter)
    _, export_s = _timed(lambda: t2i_onnx.export_parity_student(out_dir / "student", model_dir, out_dir / "onnx",
                                                                config.steps, config.total_steps, exporter))
    rows = t2i_onnx.onnx_parity(pipeline, model_dir, student, out_dir / "onnx", config.steps, config.total_steps,
                                samples, eval_seed, reference8, DigitsMetrics(bootstrap=bootstrap))
    for key, entry in rows.items():
        results["comparisons"][key].update(entry)
        say(f"{key}: ONNX FID {entry['onnx_fid']:.3f}, torch FID {entry['torch_fid']:.3f}, "
            f"max |Δ| {entry['onnx_max_abs_diff']:.1e}")
    results["onnx"] = {"export_argv": argv, "export_s": export_s, "exporter": exporter}
    return t2i_onnx.markdown(rows, argv, export_s) + [""]


def _save_grid(images, results: dict, steps, path: Path, columns: int) -> None:
    """grid.png: the teacher's reference, its best 4-NFE baseline and the student at each K, same noise per column."""
    from ..eval.digits import save_grid

    base4 = results["comparisons"].get("K=4", {}).get("baseline")
    rows = [(results["reference"], f"teacher {results['reference'].split('-')[1]}-step CFG")]
    if base4:
        rows.append((base4, f"teacher 4 NFE\n({base4})"))
    rows += [(f"tdm-{k}", f"TDM {k} step{'s' if k > 1 else ''}") for k in sorted(steps, reverse=True)]
    save_grid(images, rows, path, columns)


def _metrics_markdown(results: dict, pipeline: str, argv: list[str], rank: int, config: TDMConfig, train_s: float,
                      eval_s: float, parity: float, teacher_unchanged: bool, teacher_is_base: bool,
                      onnx_md: list[str]) -> str:
    """metrics.md: how the run was made, the results table, the acceptance checks, the parity checks, the grid."""
    from ..eval.digits import format_table

    md = [
        f"# TDM demo on the digits text-to-image {pipeline} pipeline "
        + ("shipped with tdm-fast" if Path(results["model"]) == t2i.shipped_pipeline(pipeline) else f"`{results['model']}`"),
        "",
        f"Distilled through `tdm-fast distill {' '.join(argv)}` settings (LoRA roles: student and fake score as two "
        f"adapters of rank {rank} on one base, the teacher = adapters off), unify student K ∈ {list(config.steps)}, "
        f"{config.iterations} iterations, batch {config.batch_size}, CFG {config.cfg_scale}; training {train_s:.0f} s, "
        f"evaluation {eval_s:.0f} s, total {results['total_wall_clock_s']:.0f} s on {torch.get_num_threads()} thread(s).",
        "",
        "Every row is sampled by the stock diffusers pipeline: students with `TDMScheduler`, `load_lora_weights` and "
        "`apply_steps_embedding`, guidance 1; baselines with the teacher's weights (`*-student-times`: `TDMScheduler` "
        "on the teacher; `*-trailing`: the stock scheduler at trailing spacing), images decoded by the VAE and pooled "
        "16×16 → 8×8 for the digits classifier.",
        "",
        format_table(results),
        "",
        "Acceptance: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in results["acceptance"].items()),
        "",
        f"Stock pipeline vs the engine's sampler (K={max(config.steps)}, 8 prompts, latents): max |Δ| = {parity:.2e}. "
        f"Teacher role on fixed inputs: bit-identical before and after distillation: {'yes' if teacher_unchanged else 'NO'}; "
        f"bit-identical to the folder's {'UNet' if pipeline == 'sd15' else 'transformer'} loaded afresh: "
        f"{'yes' if teacher_is_base else 'NO'}." + (" The teacher's 50-step samples come from the package's cache "
        "(its first 100 recomputed and matched)." if results.get("reference_cached") else ""),
        "",
        *onnx_md,
        "![samples](grid.png)",
        "",
    ]
    return "\n".join(md)


def _pipeline_folder(pipeline: str, model: str | Path | None) -> Path:
    """``model`` (default: the shipped ``pipeline``), refused unless it is a ``pipeline`` folder."""
    model_dir = Path(model) if model is not None else t2i.shipped_pipeline(pipeline)
    if t2i.pipeline_kind(model_dir) != pipeline:
        raise ValueError(f"{model_dir} is not a {pipeline} pipeline folder")
    return model_dir


def run_t2i_demo(
    pipeline: str = "sd15",
    out_dir: str | Path | None = None,
    iterations: int | None = None,
    samples: int = 2000,
    seed: int = 0,
    eval_seed: int = 0,
    model: str | Path | None = None,
    lora_rank: int | None = None,
    lora_targets: str | None = None,
    fake_copy: bool = False,
    columns: int = 20,
    bootstrap: int = 50,
    progress: bool = True,
    reference_steps: int = 50,
    onnx: bool = False,
    onnx_exporter: str = "dynamo",
    score_at: tuple[int, ...] = (),
    **config_overrides,
) -> dict:
    """Distils the shipped ``pipeline`` ('sd15' or 'sd3'; ``model``: another folder of the same kind),
    evaluates through the stock pipeline and writes ``grid.png``, ``metrics.md``, ``metrics.json``,
    ``train_log.jsonl``, the LoRA (``lora/``) and the student (``student/``, what ``tdm-fast export`` takes)
    to ``out_dir`` (default ``runs/demo-<pipeline>``). ``onnx``: also export the student with ``tdm-fast
    export`` (to ``onnx/``, with ``onnx_exporter``) and score its ONNX Runtime samples against torch's
    (:mod:`tdm_fast.demos.t2i_onnx`). ``score_at``: earlier iterations at which the same run is scored too, each
    into ``out_dir/iterations-<n>/`` with the same files; only with constant rates (``lr_decay='constant'``, the ε/v
    presets'; flow presets decay to the run's end) is the student there the one a run of that length trains
    (:func:`scoring_lengths` checks). Returns the
    scores at the end."""
    if pipeline not in t2i.PIPELINES:
        raise ValueError(f"--pipeline must be one of {t2i.PIPELINES}, got {pipeline!r}")
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model_dir = _pipeline_folder(pipeline, model)
    out_dir = Path(out_dir or f"runs/demo-{pipeline}")
    out_dir.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda _m: None)

    prompts_file = t2i.write_prompt_file(out_dir / "prompts.txt")
    config = demo_config(pipeline, iterations, seed=seed, model=model_dir, **config_overrides)
    lengths = scoring_lengths(config, score_at)
    run = preset_run(pipeline, model_dir, prompts_file, out_dir / "embeddings", lora_rank, lora_targets, fake_copy)
    scoring = dict(samples=samples, eval_seed=eval_seed, lora_rank=lora_rank, lora_targets=lora_targets, fake_copy=fake_copy,
                   columns=columns, bootstrap=bootstrap, reference_steps=reference_steps,
                   onnx_exporter=onnx_exporter if onnx else None, say=say)
    for n, student, train_s, teacher_unchanged, teacher_is_base in _distil(pipeline, model_dir, run, config, out_dir,
                                                                             progress, lengths):
        results = _score(pipeline, model_dir, run, student, dataclasses.replace(config, iterations=n),
                         length_folder(out_dir, n, config.iterations), prompts_file, out_dir / "embeddings", train_s,
                         teacher_unchanged, teacher_is_base, t_start, **scoring)
    return results


def _score(pipeline: str, model_dir: Path, run, student, config: TDMConfig, folder: Path, prompts_file: Path, cache: Path,
           train_s: float, teacher_unchanged: bool, teacher_is_base: bool, t_start: float, samples: int, eval_seed: int,
           lora_rank: int | None, lora_targets: str | None, fake_copy: bool, columns: int, bootstrap: int,
           reference_steps: int, onnx_exporter: str | None, say) -> dict:
    """Exports ``student`` (trained ``config.iterations`` iterations) into ``folder``, scores it through the stock
    pipeline and writes the grid, ``metrics.json`` and ``metrics.md`` there; returns the scores."""
    from ..backbones.run import export_preset_student
    from ..eval.digits import acceptance

    default_rank, default_targets = lora_defaults(pipeline)
    rank, targets = lora_rank or default_rank, lora_targets or default_targets
    argv = preset_argv(pipeline, model_dir, prompts_file, cache, lora_rank, lora_targets, fake_copy, config=config)
    export_preset_student(run, student, config, folder)
    student.save_pretrained(folder / "student")  # as `tdm-fast distill` leaves it: LoRA role + K embedding, base by path
    lora_dir = folder / "lora"

    # the stock pipeline reproduces the engine's student (scheduler, LoRA, K embedding, prompt embeddings)
    parity = pipeline_parity(pipeline, model_dir, lora_dir, student, max(config.steps), config.total_steps, seed=eval_seed)

    results, eval_s = _timed(lambda: evaluate_pipelines(
        pipeline, model_dir, lora_dir, config.steps, config.cfg_scale, samples=samples, seed=eval_seed,
        reference_steps=reference_steps, total_steps=config.total_steps, bootstrap=bootstrap, keep_images=columns, say=say))
    reference8 = results.pop("reference_images8")
    onnx_md = []
    if onnx_exporter:
        onnx_md = _onnx_parity(results, pipeline, model_dir, student, folder, config, samples, eval_seed, reference8,
                               bootstrap, onnx_exporter, say)
    _save_grid(results.pop("images"), results, config.steps, folder / "grid.png", columns)

    results.update(pipeline=pipeline, model=str(model_dir), distill_argv=argv, training={
        "iterations": config.iterations, "wall_clock_s": train_s, "s_per_iteration": train_s / max(1, config.iterations),
        "config": config.to_dict(), "lora_rank": rank, "lora_targets": targets, "fake_copy": fake_copy,
        "threads": torch.get_num_threads(),
    }, teacher_unchanged=teacher_unchanged, teacher_equals_fresh_base=teacher_is_base, pipeline_parity_max_abs=parity,
        eval_wall_clock_s=eval_s, total_wall_clock_s=time.perf_counter() - t_start)
    results["acceptance"] = acceptance(results)
    results["acceptance"]["teacher outputs bit-identical after distillation"] = teacher_unchanged and teacher_is_base
    if onnx_exporter:
        from .t2i_onnx import within_std

        for key, entry in results["comparisons"].items():
            results["acceptance"][f"{key} ONNX FID within the bootstrap std of torch's"] = within_std(entry)
    results["lora"] = str(lora_dir)
    (folder / "metrics.json").write_text(json.dumps(jsonable(results), indent=2))
    (folder / "metrics.md").write_text(_metrics_markdown(results, pipeline, argv, rank, config, train_s, eval_s, parity,
                                                         teacher_unchanged, teacher_is_base, onnx_md))
    return jsonable(results)


"""Helpers for the ``tdm-fast export`` and ``tdm-fast sample --backend`` commands.

``add_export_arguments(parser)`` / ``run_export(args)`` implement
``tdm-fast export --format compile|onnx|tensorrt --steps 1 2 4 --checkpoint DIR --out DIR``;
``add_backend_arguments(parser)`` and ``load_runner(backend, path, steps)`` give the sample
command one call signature for every backend: ``runner(noise, cond) -> x̂0``.

Files written by ``--format onnx`` (and used by ``--format tensorrt`` and the runners):
``<out>/sampler_k{K}_{dtype}.onnx`` (whole K-step sampler), ``<out>/denoiser_{dtype}.onnx``
(with ``--per-network``), ``<out>/vae_decoder_{dtype}.onnx`` (with ``--vae``: latents -> images, one graph for every K),
``<out>/sampler_k{K}_{dtype}.engine`` + ``.engine.json`` (TensorRT; ``vae_decoder_*.engine`` too),
``<out>/compile_k{K}.json`` (``--format compile``: a manifest; the compiled kernels live in
torch inductor's on-disk cache, which the export warms).
With ``--pipeline DIR`` (an SD1.5 or SD3 pipeline folder: the student's base) the folder serves prompts
without torch (:class:`~tdm_fast.export.runtime.TextToImage`): ``<out>/prompt_encoder_{dtype}.onnx`` (the
text encoders and the pipeline's prompt-embedding assembly), ``<out>/tokenizer*/tokenizer.json``, the
decoder of the folder's VAE, and ``<out>/manifest.json`` (:mod:`tdm_fast.export.manifest`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tdm_fast.atomic import staged_files
from tdm_fast.conditions import expand_null
from tdm_fast.denoiser import DENOISER_CONFIG, Denoiser
from tdm_fast.solvers import SOLVERS, trained_solver

FORMATS = ("compile", "onnx", "tensorrt")
BACKENDS = ("torch", "compile", "onnx", "tensorrt")


def _shape(text: str | None):
    if text is None or text == "":
        return None
    return tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="what to produce")
    parser.add_argument("--checkpoint", required=True, help="a folder written by Denoiser.save_pretrained")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[4], help="K values to export (e.g. 1 2 4)")
    parser.add_argument("--total-steps", type=int, default=900, help="T' of the stage times (default 900)")
    parser.add_argument("--solver", choices=SOLVERS, default=None,
                        help="the student's trajectory: ddim or dpmsolver (DPM-Solver++ 2M; default: the run's "
                             "student_solver, else ddim)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="ONNX weights/inputs precision")
    parser.add_argument("--batch-size", type=int, default=2, help="example batch for tracing (batch stays dynamic)")
    parser.add_argument("--shape", default=None, help="per-sample noise shape, e.g. 4,64,64 (default: from the model config)")
    parser.add_argument("--cond-shape", default=None,
                        help="per-sample text-embedding shape, e.g. 77,768 (default: the checkpoint's null condition)")
    parser.add_argument("--per-network", action="store_true", help="also export one network evaluation (x_t, t, cond)")
    parser.add_argument("--vae", default=None,
                        help="also export this VAE's decoder (latents -> images in [0, 1]) as its own graph: "
                             "a diffusers VAE folder or a pipeline folder with vae/")
    parser.add_argument("--pipeline", default=None,
                        help="the student's base pipeline folder (SD1.5 or SD3): also export its tokenizers, text encoders "
                             "(one prompt-encoder graph) and VAE decoder, and write manifest.json, so that "
                             "`tdm-fast sample --backend onnx --engine OUT --prompt ...` serves prompts without torch")
    parser.add_argument("--dynamic-resolution", action="store_true", help="symbolic height/width (TensorRT profiles)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch parity check")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: max-autotune on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--trt-batch", default="1,1,8", help="TensorRT batch profile min,opt,max")
    parser.add_argument("--trt-resolution", default=None,
                        help="TensorRT resolution profile hmin,wmin,hopt,wopt,hmax,wmax (with --dynamic-resolution)")
    parser.add_argument("--trt-precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--timing-cache", default=None, help="TensorRT timing-cache file to reuse")
    return parser


def add_backend_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--backend`` and ``--engine`` for ``tdm-fast sample`` (the checkpoint argument is the CLI's own)."""
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="how to run the K-step sampler")
    parser.add_argument("--engine", default=None,
                        help="exported file or folder for --backend onnx/tensorrt (default: export on the fly for onnx)")
    return parser


# -- example inputs ---------------------------------------------------------------------------


def sample_shape(denoiser: Denoiser, shape=None) -> tuple[int, ...]:
    """Per-sample noise shape: ``shape`` if given, else from the network's config."""
    if shape:
        return tuple(shape)
    if getattr(denoiser.model, "sample_shape", None) is not None:
        return tuple(denoiser.model.sample_shape)
    config = getattr(denoiser.model, "config", None)
    if config is not None:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("data_dim") is not None:
            return (int(get("data_dim")),)
        channels, size = get("in_channels"), get("sample_size")
        if channels is not None and size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            return (int(channels), *map(int, size))
    raise ValueError(f"cannot infer the sample shape of {type(denoiser.model).__name__}; pass --shape C,H,W")


def example_inputs(denoiser: Denoiser, batch: int = 2, shape=None, cond_shape=None, device=None, seed: int = 0):
    """Random noise and a condition for tracing, built from the checkpoint's null condition."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *sample_shape(denoiser, shape), generator=generator)
    null = denoiser.null_cond
    if cond_shape:
        cond = torch.randn(batch, *cond_shape, generator=generator)
    elif null is None:
        raise ValueError("the checkpoint has no null condition to infer the condition from; pass --cond-shape")
    elif isinstance(null, int):
        cond = torch.arange(batch) % max(null, 1)  # labels 0..null-1 (null is the unconditional class)
    elif isinstance(null, dict):
        cond = {k: torch.randn(batch, *v.shape, generator=generator) for k, v in null.items()}
    else:
        cond = expand_null(null, batch).clone() + 0.5 * torch.randn(batch, *null.shape, generator=generator)
    if device is not None:
        from tdm_fast.conditions import to_device

        noise, cond = noise.to(device), to_device(cond, device)
    return noise, cond


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the parity measure used throughout)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# -- export -----------------------------------------------------------------------------------


def check_export_args(args) -> None:
    """What ``tdm-fast export`` can refuse before it loads or writes anything."""
    if args.format == "tensorrt":
        from .tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise ValueError(f"--format tensorrt: {why}")
    for flag, value in (("--vae", args.vae), ("--pipeline", args.pipeline)):
        if value and args.format == "compile":
            raise ValueError(f"{flag} exports ONNX graphs: use it with --format onnx or tensorrt")
        if value and not Path(value).exists():
            raise ValueError(f"{flag} {value} does not exist")
    if args.pipeline:
        from .text import pipeline_kind

        pipeline_kind(args.pipeline)
    if args.format != "compile":
        import onnx

        low, high = (18, onnx.defs.onnx_opset_version()) if args.exporter == "dynamo" else (9, 20)
        if not low <= args.opset <= high:
            raise ValueError(f"--opset {args.opset}: the {args.exporter} exporter writes opsets {low}..{high}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, value in (("--shape", args.shape), ("--cond-shape", args.cond_shape)):
        try:
            shape = _shape(value)
        except ValueError:
            shape = ()
        if value is not None and (not shape or min(shape) < 1):
            raise ValueError(f"{flag} {value!r}: expected positive sizes such as 4,64,64")


def onnx_name(steps: int, dtype: str) -> str:
    return f"sampler_k{steps}_{dtype}.onnx"


def run_export(args, student: Denoiser | None = None) -> dict:
    """Runs ``tdm-fast export``; returns ``{"files": [...], "parity": {K or "vae_decoder": rel. error}, ...}``.

    ``student`` overrides loading ``args.checkpoint`` with ``Denoiser.from_pretrained`` (e.g. the
    CLI's own loader that also accepts run folders).
    """
    from .onnx import export_denoiser_onnx, export_sampler_onnx, resolve_dtype
    from .sampler import compile_sampler

    from .sampler import release_scheduler

    check_export_args(args)
    scheduler = release_scheduler(args.checkpoint)  # a converted release: sampled as its authors sample it
    if scheduler is not None and args.solver not in (None, scheduler.config.solver):
        raise ValueError(f"--solver {args.solver}: {args.checkpoint} is a converted release, sampled with the "
                         f"{scheduler.config.solver} steps of its authors' scheduler")
    args.solver = scheduler.config.solver if scheduler is not None else args.solver or trained_solver(args.checkpoint)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = Path(args.checkpoint)
    student = (student or Denoiser.from_pretrained(checkpoint)).to(device).eval()
    out = Path(args.out)
    created = not out.exists()
    result = {"files": [], "parity": {}, "timings_s": {}}
    try:
        # written and checked beside the folder's files, then swapped in: a failed or interrupted export
        # leaves every graph a previous export wrote as it was, and nothing that looks deployable
        with staged_files(out) as staging:
            _export_all(args, student, device, checkpoint, staging, result, scheduler)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    result["files"] = [str(out / Path(name).relative_to(staging)) for name in result["files"]]
    for name in result["files"]:
        print(f"wrote {name}")
    return result


def _export_all(args, student, device, checkpoint: Path, out: Path, result: dict, scheduler=None) -> None:
    from .onnx import export_denoiser_onnx, export_sampler_onnx, resolve_dtype
    from .sampler import compile_sampler, sample_reference

    noise, cond = example_inputs(student, args.batch_size, _shape(args.shape), _shape(args.cond_shape), device)
    text = _export_prompt_encoder(args, student, out, result) if args.pipeline else None  # cheap, and refuses a foreign base early
    for steps in args.steps:
        start = time.perf_counter()
        if args.format == "compile":
            sampler = compile_sampler(student, steps, args.total_steps, mode=args.compile_mode, solver=args.solver,
                                      scheduler=scheduler)
            got = sampler(noise, cond)
            manifest = out / f"compile_k{steps}.json"
            manifest.write_text(json.dumps({
                "checkpoint": str(checkpoint.resolve()), "steps": steps, "total_steps": args.total_steps,
                "solver": args.solver, "mode": args.compile_mode, "times": list(sampler.times), "example_shape": list(noise.shape),
            }, indent=2))
            result["files"].append(str(manifest))
            if not args.no_verify:
                result["parity"][steps] = relative_error(got, sample_reference(student, noise, cond, steps, args.total_steps,
                                                                               args.solver, scheduler))
        else:
            path = out / onnx_name(steps, args.dtype)
            result["files"].append(str(path))
            export_sampler_onnx(student, path, steps, noise, cond, args.total_steps, args.dtype,
                                dynamic_resolution=args.dynamic_resolution, opset=args.opset, exporter=args.exporter,
                                solver=args.solver, scheduler=scheduler)
            if not args.no_verify:
                from .runtime import OrtSampler

                from .sampler import cast_cond

                ref = sample_reference(student, noise, cond, steps, args.total_steps, args.solver, scheduler)
                dt = resolve_dtype(args.dtype)
                got = OrtSampler(path)(noise.to(device="cpu", dtype=dt), cast_cond(cond, dt, "cpu"))
                result["parity"][steps] = relative_error(got, ref)
            if args.format == "tensorrt":
                result["files"] += _build_engine(args, path)
        result["timings_s"][steps] = round(time.perf_counter() - start, 2)
    if args.per_network and args.format != "compile":
        path = out / f"denoiser_{args.dtype}.onnx"
        result["files"].append(str(path))
        export_denoiser_onnx(student, path, noise, cond, steps=args.steps[0] if student.steps_set else None,
                             dtype=args.dtype, dynamic_resolution=args.dynamic_resolution, opset=args.opset,
                             exporter=args.exporter)
    vae = args.vae or args.pipeline
    image_shape = _export_decoder(args, vae, noise, device, out, result) if vae else None
    if text is not None:
        result["files"].append(str(_write_manifest(args, student, checkpoint, out, noise, image_shape, text)))
    tol = parity_tolerance(args.format, args.dtype, device)
    bad = []
    for steps, err in result["parity"].items():
        label = {"vae_decoder": "VAE decoder", "prompt_encoder": "prompt encoder"}.get(steps, f"K={steps}")
        print(f"{label}: {args.format} vs torch max relative error {err:.2e}")
        if not err <= tol:
            bad.append(f"{label} ({err:.2e})")
    if bad:
        raise ValueError(f"the exported graphs do not compute what the torch model computes: {', '.join(bad)} exceed "
                         f"the {args.dtype} tolerance {tol:g}; do not deploy them (try the other --exporter)")


def parity_tolerance(fmt: str, dtype: str, device) -> float:
    """Max relative error an export may show against eager torch: 1e-4 in fp32 (as the tests), 2e-2
    in fp16; 1e-3 for a compiled sampler on a GPU that runs convolutions or matmuls in TF32 (the
    compiled kernels round differently from eager's; an H200 showed 1.7-3.6e-4)."""
    if dtype == "fp16":
        return 2e-2
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    if fmt == "compile" and torch.device(device).type == "cuda" and tf32:
        return 1e-3
    return 1e-4


def _export_decoder(args, folder, noise: torch.Tensor, device, out: Path, result: dict) -> tuple[int, int, int]:
    """``--vae`` (or ``--pipeline``): the decoder graph for the student's latents, its ORT parity and its
    engine; returns the shape of one image."""
    from .onnx import resolve_dtype
    from .vae import LatentDecoder, export_vae_decoder_onnx, load_vae

    vae = load_vae(folder).to(device)
    channels = int(vae.config.latent_channels)
    if noise.dim() != 4 or noise.shape[1] != channels:
        raise ValueError(f"the VAE decodes latents of {channels} channels (B, {channels}, h, w), but this student "
                         f"samples {tuple(noise.shape[1:])}")
    path = out / f"vae_decoder_{args.dtype}.onnx"
    result["files"].append(str(path))
    export_vae_decoder_onnx(vae, path, noise, args.dtype, dynamic_resolution=args.dynamic_resolution,
                            opset=args.opset, exporter=args.exporter)
    if not args.no_verify:
        from .runtime import OrtDecoder

        dt = resolve_dtype(args.dtype)
        with torch.no_grad():
            ref = LatentDecoder(vae)(noise)
        result["parity"]["vae_decoder"] = relative_error(OrtDecoder(path)(noise.to(device="cpu", dtype=dt)), ref)
    if args.format == "tensorrt":
        result["files"] += _build_engine(args, path)
    upscale = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.out_channels), noise.shape[2] * upscale, noise.shape[3] * upscale


def _export_prompt_encoder(args, student: Denoiser, out: Path, result: dict) -> dict:
    """``--pipeline``: tokenizer files and the prompt-encoder graph, checked against the pipeline's own
    tokenizers and ``encode_prompt``, and against the student: the graph must give, for the empty prompt,
    the unconditional condition the student was distilled with (a pipeline other than the student's base
    fails here). Returns the manifest's ``tokenizers`` and ``prompt_encoder`` entries."""
    from .runtime import _OrtRunner
    from .text import (PROBE_PROMPTS, export_prompt_encoder_onnx, input_name, load_text_pipeline, max_lengths,
                       pipeline_embeddings, pipeline_kind, pipeline_token_ids, save_tokenizers)

    kind = pipeline_kind(args.pipeline)
    null = student.null_cond
    if not isinstance(null, (torch.Tensor, dict)) or (isinstance(null, dict) and "encoder_hidden_states" not in null):
        raise ValueError("--pipeline serves prompts, but this student is not conditioned on text embeddings")
    null = null if isinstance(null, dict) else {"encoder_hidden_states": null}
    pipe = load_text_pipeline(args.pipeline)
    # the T5 length is the one the student was trained with: its condition is the CLIP tokens, then T5's
    t5_length = null["encoder_hidden_states"].shape[0] - int(pipe.tokenizer.model_max_length) if kind == "sd3" else None
    if t5_length is not None and t5_length < 1:
        raise ValueError(f"this student's condition has {null['encoder_hidden_states'].shape[0]} tokens, not the CLIP "
                         f"tokens of --pipeline {args.pipeline} followed by T5's")
    lengths = max_lengths(pipe, kind, t5_length)
    tokenizers = save_tokenizers(pipe, kind, out, lengths)
    result["files"] += [str(out / t["file"]) for t in tokenizers.values()]
    path = out / f"prompt_encoder_{args.dtype}.onnx"
    result["files"].append(str(path))
    meta = export_prompt_encoder_onnx(pipe, kind, path, lengths, t5_length, null["encoder_hidden_states"].shape[-1],
                                      args.dtype, args.opset, args.exporter)
    ids = {input_name(n): pipeline_token_ids(getattr(pipe, n), PROBE_PROMPTS, lengths[n]) for n in lengths}
    runner = _OrtRunner(path, providers=["CPUExecutionProvider"])
    got = dict(zip(runner.output_names, runner.run(ids)))
    ref = pipeline_embeddings(pipe, kind, list(PROBE_PROMPTS), t5_length)
    result["parity"]["prompt_encoder"] = max(relative_error(got[k], ref[k]) for k in ref)
    foreign = {k: relative_error(got[k][0], null[k]) for k in got if k in null}  # PROBE_PROMPTS[0] is ""
    if not foreign or max(foreign.values()) > parity_tolerance("onnx", args.dtype, "cpu"):
        raise ValueError(f"the text encoders of --pipeline {args.pipeline} do not give the empty-prompt condition this "
                         f"student was distilled with (max relative error {max(foreign.values(), default=float('inf')):.2e}): "
                         "pass the pipeline folder the student was trained on")
    return {"tokenizers": tokenizers, "prompt_encoder": {"file": path.name, "inputs": meta["inputs"], "outputs": meta["outputs"]},
            "pipeline": kind, "pipeline_class": type(pipe).__name__}


def _write_manifest(args, student: Denoiser, checkpoint: Path, out: Path, noise, image_shape, text: dict) -> Path:
    from .manifest import sampler_key, write_manifest
    from .onnx import read_metadata

    graphs = {"prompt_encoder": text["prompt_encoder"], "vae_decoder": {"file": f"vae_decoder_{args.dtype}.onnx"}}
    graphs.update({sampler_key(k): {"file": onnx_name(k, args.dtype), "steps": k} for k in args.steps})
    return write_manifest(out, {
        "pipeline": text["pipeline"],
        "model": {"pipeline_class": text["pipeline_class"], "pipeline_folder": str(Path(args.pipeline).resolve()),
                  "checkpoint": str(checkpoint.resolve()), "backbone": read_metadata(out / onnx_name(args.steps[0], args.dtype))["backbone"]},
        "dtype": args.dtype, "solver": args.solver, "total_steps": args.total_steps,
        "sample_shape": list(noise.shape[1:]), "image_shape": list(image_shape),
        "graphs": graphs, "tokenizers": text["tokenizers"],
    })


def _build_engine(args, onnx_path: Path) -> list[str]:
    """The TensorRT engine of one exported graph with the ``--trt-*`` settings; the files written."""
    from .tensorrt import build_engine

    resolution = _shape(args.trt_resolution)
    if resolution:
        resolution = (resolution[0:2], resolution[2:4], resolution[4:6])
    engine = build_engine(onnx_path, batch=_shape(args.trt_batch), resolution=resolution,
                          fp16=args.trt_precision == "fp16", bf16=args.trt_precision == "bf16",
                          timing_cache=args.timing_cache)
    return [str(engine), str(engine) + ".json"]


# -- runners ----------------------------------------------------------------------------------


class TorchRunner:
    """Eager torch: ``runner(noise, cond) -> x̂0`` via :func:`tdm_fast.sampling.sample_student` (a converted
    release: its ``scheduler``'s steps, :func:`~tdm_fast.export.sampler.sample_reference`)."""

    backend = "torch"

    def __init__(self, student: Denoiser, steps: int, total_steps: int = 900, solver: str = "ddim", scheduler=None):
        self.student, self.steps, self.total_steps, self.solver = student, steps, total_steps, solver
        self.scheduler = scheduler

    def __call__(self, noise, cond):
        from .sampler import sample_reference

        return sample_reference(self.student, noise, cond, self.steps, self.total_steps, self.solver, self.scheduler)


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / DENOISER_CONFIG).is_file()


def _find(path: Path, steps: int, suffix: str) -> Path:
    if path.is_file():
        return path
    matches = sorted(path.glob(f"sampler_k{steps}_*{suffix}"))
    if not matches:
        raise FileNotFoundError(f"no sampler_k{steps}_*{suffix} in {path}; run tdm-fast export --steps {steps} first")
    return matches[0]


def load_runner(backend: str, path_or_checkpoint, steps: int, total_steps: int = 900, device=None,
                engine=None, dtype: str = "fp32", compile_mode: str | None = None,
                student: Denoiser | None = None, solver: str = "ddim"):
    """A sampler ``runner(noise, cond) -> x̂0`` for ``backend`` in ``torch|compile|onnx|tensorrt``.

    ``path_or_checkpoint`` is a ``Denoiser.save_pretrained`` folder (torch, compile; onnx exports
    it to a temporary file on the fly) or an exported ``.onnx`` / ``.engine`` file or the
    ``tdm-fast export --out`` folder (``engine`` overrides it for onnx/tensorrt). ``student``: an
    already loaded denoiser to use instead of loading the checkpoint (torch, compile, onnx on the fly).
    ``solver``: the trajectory (``ddim`` or ``dpmsolver``); an exported graph or engine must have been
    exported with it. A converted release's checkpoint is sampled with its ``scheduler/`` (torch, compile,
    onnx on the fly).
    """
    from .sampler import release_scheduler

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(engine or path_or_checkpoint)
    scheduler = release_scheduler(path_or_checkpoint)
    if backend in ("torch", "compile"):
        if student is None and not _is_checkpoint(path):
            raise FileNotFoundError(f"{path} is not a checkpoint folder (no {DENOISER_CONFIG})")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        student = (student or Denoiser.from_pretrained(path)).to(device).eval()
        if backend == "torch":
            return TorchRunner(student, steps, total_steps, solver, scheduler)
        from .sampler import compile_sampler

        return compile_sampler(student, steps, total_steps, mode=compile_mode, solver=solver, scheduler=scheduler)
    if backend == "onnx":
        from .runtime import OrtSampler

        if student is not None or _is_checkpoint(path):
            student = (student or Denoiser.from_pretrained(path)).eval()
            from .onnx import export_sampler_onnx

            noise, cond = example_inputs(student, 2)
            # the session holds the graph once built, so the file is not kept
            with tempfile.TemporaryDirectory(prefix="tdm_fast_onnx_") as tmp:
                graph = Path(tmp) / onnx_name(steps, dtype)
                export_sampler_onnx(student, graph, steps, noise, cond, total_steps, dtype, solver=solver, scheduler=scheduler)
                return OrtSampler(graph)
        runner = OrtSampler(_find(path, steps, ".onnx"))
        if runner.steps is not None and runner.steps != steps:
            raise ValueError(f"{runner.path} samples with K={runner.steps}, not {steps}")
        if runner.solver != solver:
            raise ValueError(f"{runner.path} samples with the {runner.solver} solver, not {solver}")
        return runner
    from .tensorrt import TensorRTRunner

    if _is_checkpoint(path):
        raise FileNotFoundError(f"{path} is a checkpoint; build an engine first: tdm-fast export --format tensorrt --steps {steps}")
    runner = TensorRTRunner(_find(path, steps, ".engine"))
    built = runner.meta.get("onnx_metadata", {}).get("steps")
    if built is not None and built != steps:
        raise ValueError(f"{runner.engine_path} samples with K={built}, not {steps}")
    built_solver = runner.meta.get("onnx_metadata", {}).get("solver", "ddim")
    if built_solver != solver:
        raise ValueError(f"{runner.engine_path} samples with the {built_solver} solver, not {solver}")
    return runner

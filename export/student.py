"""The export pipeline of ``tdm-fast export``, taking values: :func:`export_student` writes a student's K-step
sampler graphs (ONNX, TensorRT engines, or ``torch.export`` programs), optionally its VAE decoder and
its pipeline's prompt encoder, each checked against eager torch; :mod:`tdm_fast.export.cli` is the command
line's face over it. The files written are listed in :mod:`tdm_fast.export.cli`'s docstring.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tdm_fast.atomic import staged_files
from tdm_fast.conditions import expand_null
from tdm_fast.denoiser import Denoiser
from tdm_fast.solvers import trained_solver

FORMATS = ("compile", "onnx", "tensorrt")


@dataclass(frozen=True)
class ExportOptions:
    """What ``tdm-fast export`` exports, one field per flag (``verify=False`` is ``--no-verify``). Shapes are
    tuples or the flags' text (``"4,64,64"``)."""

    checkpoint: str | Path
    out: str | Path
    format: str = "onnx"
    steps: tuple[int, ...] = (4,)
    total_steps: int = 900
    solver: str | None = None  # None: the run's student_solver, else ddim
    dtype: str = "fp32"
    batch_size: int = 2
    shape: str | tuple[int, ...] | None = None
    cond_shape: str | tuple[int, ...] | None = None
    per_network: bool = False
    vae: str | Path | None = None
    pipeline: str | Path | None = None
    variant: str | None = None  # the weight files of --vae and --pipeline (diffusers' variant, e.g. fp16)
    dynamic_resolution: bool = False
    opset: int = 18
    exporter: str = "dynamo"
    verify: bool = True
    compile_mode: str | None = None
    device: str | None = None
    trt_batch: str | tuple[int, ...] = "1,1,8"
    trt_resolution: str | tuple[int, ...] | None = None
    trt_precision: str = "fp16"
    timing_cache: str | Path | None = None


def _shape(text: str | tuple[int, ...] | None):
    """A shape given as ``"4,64,64"`` (or ``4x64x64``, as the flags take it) or as a tuple."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    return tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())


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


def check_export_options(options: ExportOptions) -> None:
    """What ``tdm-fast export`` can refuse before it loads or writes anything."""
    if options.format == "tensorrt":
        from .tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise ValueError(f"--format tensorrt: {why}")
    for flag, value in (("--vae", options.vae), ("--pipeline", options.pipeline)):
        if value and options.format == "compile":
            raise ValueError(f"{flag} exports ONNX graphs: use it with --format onnx or tensorrt")
        if value and not Path(value).exists():
            raise ValueError(f"{flag} {value} does not exist")
    from tdm_fast.backbones.validate import check_pipeline_folder, check_vae_folder

    if options.pipeline:  # damaged files of what the prompt path reads (the student is its own denoiser)
        from .text import pipeline_kind

        check_pipeline_folder(options.pipeline, ("tokenizer", "text_encoder", "vae"))
        pipeline_kind(options.pipeline)
    if options.vae:
        check_vae_folder(options.vae)
    if options.format != "compile":
        import onnx

        low, high = (18, onnx.defs.onnx_opset_version()) if options.exporter == "dynamo" else (9, 20)
        if not low <= options.opset <= high:
            raise ValueError(f"--opset {options.opset}: the {options.exporter} exporter writes opsets {low}..{high}")
    if options.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {options.batch_size}")
    try:
        device = torch.device(options.device or "cpu")
    except RuntimeError as exc:  # torch's own message names the accepted device types
        raise ValueError(f"--device {options.device}: {str(exc).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {options.device}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                         "use --device cpu, or leave --device out")
    for flag, value in (("--shape", options.shape), ("--cond-shape", options.cond_shape)):
        try:
            shape = _shape(value)
        except ValueError:
            shape = ()
        if value is not None and (not shape or min(shape) < 1):
            raise ValueError(f"{flag} {value!r}: expected positive sizes such as 4,64,64")


def onnx_name(steps: int, dtype: str) -> str:
    return f"sampler_k{steps}_{dtype}.onnx"


def export_student(checkpoint: str | Path, out: str | Path, student: Denoiser | None = None, **settings) -> dict:
    """``tdm-fast export`` from Python: the student of ``checkpoint`` (a ``Denoiser.save_pretrained`` folder)
    exported into ``out`` with the :class:`ExportOptions` ``settings`` (e.g. ``steps=(1, 2, 4)``,
    ``vae=PIPELINE_DIR``, ``device="cpu"``). Returns ``{"files": [...], "parity": {K or "vae_decoder": rel.
    error}, "timings_s": {...}}``; raises ValueError when a graph does not compute what torch computes.

    ``student`` overrides loading ``checkpoint`` with ``Denoiser.from_pretrained`` (e.g. the CLI's own
    loader that also accepts run folders).
    """
    return run_export_options(ExportOptions(checkpoint=checkpoint, out=out, **settings), student)


def run_export_options(options: ExportOptions, student: Denoiser | None = None) -> dict:
    """:func:`export_student` with its settings gathered in one :class:`ExportOptions`."""
    from .sampler import release_scheduler

    check_export_options(options)
    scheduler = release_scheduler(options.checkpoint)  # a converted release: sampled as its authors sample it
    if scheduler is not None and options.solver not in (None, scheduler.config.solver):
        raise ValueError(f"--solver {options.solver}: {options.checkpoint} is a converted release, sampled with the "
                         f"{scheduler.config.solver} steps of its authors' scheduler")
    options = replace(options, solver=scheduler.config.solver if scheduler is not None
                      else options.solver or trained_solver(options.checkpoint))
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = Path(options.checkpoint)
    student = (student or Denoiser.from_pretrained(checkpoint)).to(device).eval()
    out = Path(options.out)
    created = not out.exists()
    result = {"files": [], "parity": {}, "timings_s": {}}
    try:
        # written and checked beside the folder's files, then swapped in: a failed or interrupted export
        # leaves every graph a previous export wrote as it was, and nothing that looks deployable
        with staged_files(out) as staging:
            _export_all(options, student, device, checkpoint, staging, result, scheduler)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    result["files"] = [str(out / Path(name).relative_to(staging)) for name in result["files"]]
    for name in result["files"]:
        print(f"wrote {name}")
    return result


def _export_all(options, student, device, checkpoint: Path, out: Path, result: dict, scheduler=None) -> None:
    from .manifest import LAYOUT, MODEL_INDEX, sampler_file
    from .onnx import export_denoiser_onnx, export_sampler_onnx, resolve_dtype
    from .sampler import sample_reference

    noise, cond = example_inputs(student, options.batch_size, _shape(options.shape), _shape(options.cond_shape), device)
    text = _export_prompt_encoder(options, student, out, result) if options.pipeline else None  # cheap, and refuses a foreign base early
    for steps in options.steps:
        start = time.perf_counter()
        if options.format == "compile":
            from .program import ProgramSampler, export_sampler_program, program_name

            path = out / program_name(steps, "fp32")
            result["files"].append(str(path))
            export_sampler_program(student, path, steps, noise, cond, options.total_steps, options.solver, scheduler,
                                   options.compile_mode)
            if options.verify:  # the saved file itself, compiled as `sample --backend compile --engine` compiles it
                got = ProgramSampler(path)(noise, cond)
                result["parity"][steps] = relative_error(got, sample_reference(student, noise, cond, steps, options.total_steps,
                                                                               options.solver, scheduler))
        else:
            path = out / (sampler_file(steps, options.dtype) if options.pipeline else onnx_name(steps, options.dtype))
            result["files"].append(str(path))
            export_sampler_onnx(student, path, steps, noise, cond, options.total_steps, options.dtype,
                                dynamic_resolution=options.dynamic_resolution, opset=options.opset, exporter=options.exporter,
                                solver=options.solver, scheduler=scheduler)
            if options.verify:
                from .runtime import OrtSampler

                from .sampler import cast_cond

                ref = sample_reference(student, noise, cond, steps, options.total_steps, options.solver, scheduler)
                dt = resolve_dtype(options.dtype)
                got = OrtSampler(path)(noise.to(device="cpu", dtype=dt), cast_cond(cond, dt, "cpu"))
                result["parity"][steps] = relative_error(got, ref)
            if options.format == "tensorrt":
                result["files"] += _build_engine(options, path)
        result["timings_s"][steps] = round(time.perf_counter() - start, 2)
    if options.per_network and options.format != "compile":
        path = out / f"denoiser_{options.dtype}.onnx"
        result["files"].append(str(path))
        export_denoiser_onnx(student, path, noise, cond, steps=options.steps[0] if student.steps_set else None,
                             dtype=options.dtype, dynamic_resolution=options.dynamic_resolution, opset=options.opset,
                             exporter=options.exporter)
    vae = options.vae or options.pipeline
    image_shape = _export_decoder(options, vae, noise, device, out, result) if vae else None
    if text is not None:
        manifest = _write_manifest(options, student, checkpoint, out, noise, image_shape, text, scheduler)
        result["files"] += [str(out / LAYOUT["scheduler"]), str(out / MODEL_INDEX), str(manifest)]
    tol = parity_tolerance(options.format, options.dtype, device)
    bad = []
    for steps, err in result["parity"].items():
        label = {"vae_decoder": "VAE decoder", "prompt_encoder": "prompt encoder"}.get(steps, f"K={steps}")
        print(f"{label}: {options.format} vs torch max relative error {err:.2e}")
        if not err <= tol:
            bad.append(f"{label} ({err:.2e})")
    if bad:
        raise ValueError(f"the exported graphs do not compute what the torch model computes: {', '.join(bad)} exceed "
                         f"the {options.dtype} tolerance {tol:g}; do not deploy them (try the other --exporter)")


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


def _export_decoder(options, folder, noise: torch.Tensor, device, out: Path, result: dict) -> tuple[int, int, int]:
    """``--vae`` (or ``--pipeline``): the decoder graph for the student's latents, its ORT parity and its
    engine; returns the shape of one image."""
    from .manifest import LAYOUT
    from .onnx import resolve_dtype
    from .vae import LatentDecoder, export_vae_decoder_onnx, load_vae

    vae = load_vae(folder, options.variant).to(device)
    channels = int(vae.config.latent_channels)
    if noise.dim() != 4 or noise.shape[1] != channels:
        raise ValueError(f"the VAE decodes latents of {channels} channels (B, {channels}, h, w), but this student "
                         f"samples {tuple(noise.shape[1:])}")
    path = out / (LAYOUT["vae_decoder"] if options.pipeline else f"vae_decoder_{options.dtype}.onnx")
    result["files"].append(str(path))
    export_vae_decoder_onnx(vae, path, noise, options.dtype, dynamic_resolution=options.dynamic_resolution,
                            opset=options.opset, exporter=options.exporter)
    if options.verify:
        from .runtime import OrtDecoder

        dt = resolve_dtype(options.dtype)
        with torch.no_grad():
            ref = LatentDecoder(vae)(noise)
        result["parity"]["vae_decoder"] = relative_error(OrtDecoder(path)(noise.to(device="cpu", dtype=dt)), ref)
    if options.format == "tensorrt":
        result["files"] += _build_engine(options, path)
    upscale = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.out_channels), noise.shape[2] * upscale, noise.shape[3] * upscale


def _export_prompt_encoder(options, student: Denoiser, out: Path, result: dict) -> dict:
    """``--pipeline``: tokenizer files and the prompt-encoder graph, checked against the pipeline's own
    tokenizers and ``encode_prompt``, and against the student: the graph must give, for the empty prompt,
    the unconditional condition the student was distilled with (a pipeline other than the student's base
    fails here). Returns the manifest's ``tokenizers`` and ``prompt_encoder`` entries."""
    from .manifest import LAYOUT
    from .runtime import _OrtRunner
    from .text import (PROBE_PROMPTS, export_prompt_encoder_onnx, input_name, load_text_pipeline, max_lengths,
                       pipeline_embeddings, pipeline_kind, pipeline_token_ids, save_tokenizers)

    kind = pipeline_kind(options.pipeline)
    null = student.null_cond
    if not isinstance(null, (torch.Tensor, dict)) or (isinstance(null, dict) and "encoder_hidden_states" not in null):
        raise ValueError("--pipeline serves prompts, but this student is not conditioned on text embeddings")
    null = null if isinstance(null, dict) else {"encoder_hidden_states": null}
    pipe = load_text_pipeline(options.pipeline, options.variant)
    # the T5 length is the one the student was trained with: its condition is the CLIP tokens, then T5's
    t5_length = null["encoder_hidden_states"].shape[0] - int(pipe.tokenizer.model_max_length) if kind == "sd3" else None
    if t5_length is not None and t5_length < 1:
        raise ValueError(f"this student's condition has {null['encoder_hidden_states'].shape[0]} tokens, not the CLIP "
                         f"tokens of --pipeline {options.pipeline} followed by T5's")
    lengths = max_lengths(pipe, kind, t5_length)
    tokenizers = save_tokenizers(pipe, kind, out, lengths)
    result["files"] += [str(out / t["file"]) for t in tokenizers.values()]
    path = out / LAYOUT["prompt_encoder"]
    path.parent.mkdir(parents=True, exist_ok=True)
    result["files"].append(str(path))
    meta = export_prompt_encoder_onnx(pipe, kind, path, lengths, t5_length, null["encoder_hidden_states"].shape[-1],
                                      options.dtype, options.opset, options.exporter)
    ids = {input_name(n): pipeline_token_ids(getattr(pipe, n), PROBE_PROMPTS, lengths[n]) for n in lengths}
    runner = _OrtRunner(path, providers=["CPUExecutionProvider"])
    got = dict(zip(runner.output_names, runner.run(ids)))
    ref = pipeline_embeddings(pipe, kind, list(PROBE_PROMPTS), t5_length)
    result["parity"]["prompt_encoder"] = max(relative_error(got[k], ref[k]) for k in ref)
    foreign = {k: relative_error(got[k][0], null[k]) for k in got if k in null}  # PROBE_PROMPTS[0] is ""
    if not foreign or max(foreign.values()) > parity_tolerance("onnx", options.dtype, "cpu"):
        raise ValueError(f"the text encoders of --pipeline {options.pipeline} do not give the empty-prompt condition this "
                         f"student was distilled with (max relative error {max(foreign.values(), default=float('inf')):.2e}): "
                         "pass the pipeline folder the student was trained on")
    return {"tokenizers": tokenizers, "prompt_encoder": {"file": LAYOUT["prompt_encoder"], "inputs": meta["inputs"], "outputs": meta["outputs"]},
            "pipeline": kind, "pipeline_class": type(pipe).__name__}


def _write_manifest(options, student: Denoiser, checkpoint: Path, out: Path, noise, image_shape, text: dict, scheduler=None) -> Path:
    """The deployment folder's ``scheduler/``, ``model_index.json`` and ``manifest.json`` (paths relative to
    ``out``; the pipeline and checkpoint named, not located: the folder is moved to where it serves)."""
    from tdm_fast.publish import base_model_reference, save_tdm_scheduler

    from .manifest import LAYOUT, sampler_file, sampler_key, write_manifest, write_model_index
    from .onnx import _version, read_metadata

    if scheduler is not None:  # a converted release: its authors' steps, which the graphs follow
        scheduler.save_pretrained(out / Path(LAYOUT["scheduler"]).parent)
    else:
        config = json.loads((Path(options.pipeline) / LAYOUT["scheduler"]).read_text())
        save_tdm_scheduler(out, config, options.total_steps, options.solver, student.steps_set)
    write_model_index(out, list(text["tokenizers"]), _version())
    graphs = {"prompt_encoder": text["prompt_encoder"], "vae_decoder": {"file": LAYOUT["vae_decoder"]}}
    graphs.update({sampler_key(k): {"file": sampler_file(k, options.dtype), "steps": k} for k in options.steps})
    checkpoint = checkpoint.resolve()
    return write_manifest(out, {
        "pipeline": text["pipeline"],
        "model": {"pipeline_class": text["pipeline_class"], "pipeline_folder": base_model_reference(options.pipeline)["name"],
                  "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
                  "backbone": read_metadata(out / graphs[sampler_key(options.steps[0])]["file"])["backbone"]},
        "dtype": options.dtype, "solver": options.solver, "total_steps": options.total_steps,
        "sample_shape": list(noise.shape[1:]), "image_shape": list(image_shape),
        "graphs": graphs, "tokenizers": text["tokenizers"], "scheduler": {"file": LAYOUT["scheduler"]},
    })


def _build_engine(options, onnx_path: Path) -> list[str]:
    """The TensorRT engine of one exported graph with the ``--trt-*`` settings; the files written."""
    from .tensorrt import build_engine

    resolution = _shape(options.trt_resolution)
    if resolution:
        resolution = (resolution[0:2], resolution[2:4], resolution[4:6])
    engine = build_engine(onnx_path, batch=_shape(options.trt_batch), resolution=resolution,
                          fp16=options.trt_precision == "fp16", bf16=options.trt_precision == "bf16",
                          timing_cache=options.timing_cache)
    return [str(engine), str(engine) + ".json"]

"""Helpers for the ``tdm-fast export`` and ``tdm-fast sample --backend`` commands.

``add_export_arguments(parser)`` / ``run_export(args)`` implement
``tdm-fast export --format compile|onnx|tensorrt --steps 1 2 4 --checkpoint DIR --out DIR`` over the
value-taking :func:`tdm_fast.export.student.export_student`;
``add_backend_arguments(parser)`` and ``load_runner(backend, path, steps)`` give the sample
command one call signature for every backend: ``runner(noise, cond) -> x̂0``.

Files written by ``--format onnx`` (and used by ``--format tensorrt`` and the runners):
``<out>/sampler_k{K}_{dtype}.onnx`` (whole K-step sampler), ``<out>/denoiser_{dtype}.onnx``
(with ``--per-network``), ``<out>/vae_decoder_{dtype}.onnx`` (with ``--vae``: latents -> images, one graph for every K),
``<out>/sampler_k{K}_{dtype}.engine`` + ``.engine.json`` (TensorRT; ``vae_decoder_*.engine`` too),
``<out>/sampler_k{K}_fp32.pt2`` (``--format compile``: the sampler as a ``torch.export`` program, which
``sample --backend compile --engine`` loads and compiles: :mod:`tdm_fast.export.program`).
With ``--pipeline DIR`` (an SD1.5 or SD3 pipeline folder: the student's base) the folder serves prompts
without torch (:class:`~tdm_fast.export.runtime.TextToImage`), in one folder per component as diffusers'
ONNX exports: ``<out>/text_encoder/model.onnx`` (the text encoders and the pipeline's prompt-embedding
assembly), ``<out>/sampler/sampler_k{K}_{dtype}.onnx``, ``<out>/vae_decoder/model.onnx`` (the decoder of the
folder's VAE), ``<out>/tokenizer*/tokenizer.json``, ``<out>/scheduler/scheduler_config.json``,
``<out>/model_index.json`` and ``<out>/manifest.json`` (:mod:`tdm_fast.export.manifest`).
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from tdm_fast.denoiser import DENOISER_CONFIG, Denoiser
from tdm_fast.cli.hub_flags import add_hub_arguments
from tdm_fast.solvers import SOLVERS

from .student import (FORMATS, ExportOptions, check_export_options, example_inputs, onnx_name, parity_tolerance,  # noqa: F401
                      relative_error, run_export_options, sample_shape)

BACKENDS = ("torch", "compile", "onnx", "tensorrt")


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
                             "a diffusers VAE folder or a pipeline folder with vae/, or its Hub model id")
    parser.add_argument("--pipeline", default=None,
                        help="the student's base pipeline folder (SD1.5 or SD3) or its Hub model id: also export its "
                             "tokenizers, text encoders "
                             "(one prompt-encoder graph) and VAE decoder, and write manifest.json, so that "
                             "`tdm-fast sample --backend onnx --engine OUT --prompt ...` serves prompts without torch")
    add_hub_arguments(parser)
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
                        help="exported file or folder for --backend compile/onnx/tensorrt (a .pt2 program of "
                             "export --format compile; default: compile or export on the fly from --checkpoint)")
    return parser


def export_options(args) -> ExportOptions:
    """The :class:`ExportOptions` of ``tdm-fast export``'s flags."""
    given = {f.name: getattr(args, f.name) for f in fields(ExportOptions) if f.name != "verify"}
    return ExportOptions(**{**given, "steps": tuple(args.steps)}, verify=not args.no_verify)


def check_export_args(args) -> None:
    """What ``tdm-fast export`` can refuse before it loads or writes anything."""
    check_export_options(export_options(args))


def run_export(args, student: Denoiser | None = None) -> dict:
    """Runs ``tdm-fast export``; returns ``{"files": [...], "parity": {K or "vae_decoder": rel. error}, ...}``.
    ``student`` overrides loading ``--checkpoint`` (e.g. the CLI's own loader that also accepts run folders)."""
    return run_export_options(export_options(args), student)


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
    """``path`` itself, or its K-step sampler file: at the top (``--format onnx``) or in ``sampler/`` (``--pipeline``)."""
    if path.is_file():
        return path
    matches = sorted(path.glob(f"sampler_k{steps}_*{suffix}")) + sorted(path.glob(f"sampler/sampler_k{steps}_*{suffix}"))
    if not matches:
        raise FileNotFoundError(f"no sampler_k{steps}_*{suffix} in {path}; run tdm-fast export --steps {steps} first")
    return matches[0]


def load_runner(backend: str, path_or_checkpoint, steps: int, total_steps: int = 900, device=None,
                engine=None, dtype: str = "fp32", compile_mode: str | None = None,
                student: Denoiser | None = None, solver: str = "ddim"):
    """A sampler ``runner(noise, cond) -> x̂0`` for ``backend`` in ``torch|compile|onnx|tensorrt``.

    ``path_or_checkpoint`` is a ``Denoiser.save_pretrained`` folder (torch, compile; onnx exports
    it to a temporary file on the fly) or an exported ``.pt2`` / ``.onnx`` / ``.engine`` file or the
    ``tdm-fast export --out`` folder (``engine`` overrides it for compile/onnx/tensorrt). ``student``: an
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
    if backend == "compile" and (engine is not None or (student is None and not _is_checkpoint(path))):
        from .program import ProgramSampler

        runner = ProgramSampler(_find(path, steps, ".pt2"), mode=compile_mode)
        return _check_built(runner, runner.path, runner.steps, runner.solver, steps, solver)
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
        return _check_built(runner, runner.path, runner.steps, runner.solver, steps, solver)
    from .tensorrt import TensorRTRunner

    if _is_checkpoint(path):
        raise FileNotFoundError(f"{path} is a checkpoint; build an engine first: tdm-fast export --format tensorrt --steps {steps}")
    runner = TensorRTRunner(_find(path, steps, ".engine"))
    built = runner.meta.get("onnx_metadata", {})
    return _check_built(runner, runner.engine_path, built.get("steps"), built.get("solver", "ddim"), steps, solver)


def _check_built(runner, path, built_steps: int | None, built_solver: str, steps: int, solver: str):
    """``runner`` when the exported file samples ``steps`` with ``solver``; else a ValueError naming the file."""
    if built_steps is not None and built_steps != steps:
        raise ValueError(f"{path} samples with K={built_steps}, not {steps}")
    if built_solver != solver:
        raise ValueError(f"{path} samples with the {built_solver} solver, not {solver}")
    return runner

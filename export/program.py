"""The K-step sampler as a saved ``torch.export`` program: what ``tdm-fast export --format compile`` writes and
``tdm-fast sample --backend compile --engine FILE`` runs.

:func:`export_sampler_program` traces the same :class:`~tdm_fast.export.sampler.StudentSampler` the ONNX
export traces (loop unrolled, times and α/σ baked in, LoRA fused, dynamic batch) with ``torch.export`` and
saves it with ``torch.export.save`` as ``sampler_k{K}_{dtype}.pt2``, its settings (K, solver, times,
backbone, ``--compile-mode``) inside the archive. :class:`ProgramSampler` loads it with
``torch.export.load`` — no checkpoint, no model code of the run — and ``torch.compile``\\ s the loaded module
(Inductor compiles once per input shape in the loading process; its on-disk cache makes later processes
quick). AOTInductor packages (``torch._inductor.aoti_compile_and_package``) would carry the compiled kernels
too, but building one took 43 s for the toy MLP's 4-step sampler on 2 CPU cores, so the export writes the
program and leaves compiling to the machine that runs it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from tdm_fast.denoiser import Denoiser

from .onnx import _export_inputs, _version, dtype_name
from .sampler import StudentSampler

METADATA = "tdm_fast.json"  # the archive's extra file holding the settings


def program_name(steps: int, dtype: str) -> str:
    return f"sampler_k{steps}_{dtype}.pt2"


def export_sampler_program(student: Denoiser, path: str | Path, steps: int, noise: torch.Tensor, cond, total_steps: int = 900,
                           solver: str = "ddim", scheduler=None, mode: str | None = None) -> dict:
    """Saves the K-step sampler of ``student`` (fp32) as a ``torch.export`` program at ``path``; returns its
    settings. ``noise``/``cond``: example inputs (the batch stays dynamic); ``mode``: the ``torch.compile``
    mode :class:`ProgramSampler` compiles it with."""
    model, spec, noise, conds = _export_inputs(student, noise, cond, torch.float32, True, None)
    sampler = StudentSampler(model, steps, total_steps, solver, scheduler).eval()
    cond = spec.unflatten(conds)
    batch = torch.export.Dim("batch", min=1)
    cond_dims = {name: {0: batch} for name in cond} if isinstance(cond, dict) else {0: batch}
    with warnings.catch_warnings(), torch.no_grad():
        # the steps embedding's index is set on the module and read within the same call: no state to export
        warnings.filterwarnings("ignore", message=".*was assigned during export.*")
        program = torch.export.export(sampler, (noise, cond), dynamic_shapes=({0: batch}, cond_dims), strict=False)
    meta = {"graph": "sampler", "steps": steps, "total_steps": sampler.total_steps, "solver": sampler.solver,
            "timesteps": list(sampler.times), "backbone": sampler.backbone, "dtype": dtype_name(noise.dtype),
            "cond_kind": spec.kind, "mode": mode, "device": str(noise.device),
            "tdm_fast_version": _version(), "torch_version": torch.__version__}
    with open(path, "wb") as file:  # Python's open: what an interrupted or failed write is caught at
        torch.export.save(program, file, extra_files={METADATA: json.dumps(meta)})
    return meta


class ProgramSampler:
    """``ProgramSampler(path)(noise, cond) -> x̂0``: a program written by :func:`export_sampler_program`,
    compiled with ``torch.compile`` (``mode``: default the export's ``--compile-mode``; ``compile=False`` runs
    the loaded program as it is). It runs on the device it was exported on."""

    backend = "compile"

    def __init__(self, path: str | Path, mode: str | None = None, compile: bool = True):
        self.path = Path(path)
        extra = {METADATA: ""}
        try:
            program = torch.export.load(self.path, extra_files=extra)
        except Exception as exc:  # a zip of something else, or a file cut short: torch's errors vary
            raise ValueError(f"{self.path} is not a program written by tdm-fast export --format compile "
                             f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
        if not extra[METADATA]:
            raise ValueError(f"{self.path} is a torch.export program, but not a sampler written by tdm-fast export --format compile")
        self.meta = json.loads(extra[METADATA])
        self.steps, self.solver, self.times = self.meta["steps"], self.meta["solver"], tuple(self.meta["timesteps"])
        self.module = program.module()
        cuda = self.meta["device"].startswith("cuda")
        mode = mode or self.meta.get("mode") or ("max-autotune" if cuda else None)  # as compile_sampler picks
        self.run = torch.compile(self.module, mode=mode) if compile else self.module
        # CUDA graphs hand back a static buffer that the next replay overwrites
        self.clone_output = cuda and mode in ("reduce-overhead", "max-autotune")

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, cond) -> torch.Tensor:
        out = self.run(noise, cond)
        return out.clone() if self.clone_output else out

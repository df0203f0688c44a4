"""Backend choice and the launch geometry shared by the fused ops.

Backends: ``triton`` (the @triton.jit kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1),
``native`` (the same single-pass loops in C++, built on first use, see ``_native``; the measured
fastest on CPU, see bench/bench_kernels.py), ``compile`` (the same formulation in torch, compiled by
Inductor; the CPU fallback where no compiler builds the native loops) and ``torch`` (the reference;
also the CPU fallback where Inductor does not work either). ``TDM_FAST_KERNELS`` forces one.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from . import _native

BACKENDS = ("triton", "native", "compile", "torch")
ENV = "TDM_FAST_KERNELS"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Below these sizes (elements per call) a CPU call is cheaper in the eager reference than through
# the ~0.1 ms fixed cost of a compiled Inductor call (Dynamo guards, validation); measured with
# bench/bench_kernels.py-style timing on a 2-core x86 box, one torch thread. The generator loss's
# fused form wins at every size (its reference runs ~25 ops forward and backward). A native call
# costs ~20 µs of Python and ctypes: only the DDIM jump's reference (two ops) is cheaper below 2^15.
COMPILE_MIN_NUMEL = {"tdm_generator_loss": 0, "renoise": 1 << 15, "fake_score_loss": 1 << 15, "ddim_jump": 1 << 17}
NATIVE_MIN_NUMEL = {"ddim_jump": 1 << 15}


def select(x: torch.Tensor, op: str | None = None) -> str:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, got {forced!r}")
        if forced == "triton" and x.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 set before tdm_fast.kernels is imported"
            )
        if forced == "native" and x.device.type != "cpu":
            raise RuntimeError(f"{ENV}=native runs CPU tensors only, got {x.device} tensors")
        return forced
    if x.device.type == "cuda":
        return "triton"
    if x.device.type == "cpu":
        fused = cpu_backend()
        if fused == "torch":
            return "torch"
        threshold = (NATIVE_MIN_NUMEL if fused == "native" else COMPILE_MIN_NUMEL).get(op, 0)
        return "torch" if x.numel() < threshold else fused
    return "torch"


def cpu_backend() -> str:
    """The fused backend CPU tensors get: the native loops, else Inductor, else the reference."""
    return "native" if _native.available() else _cpu_fallback()


@functools.cache
def _cpu_fallback() -> str:
    """Where the native loops do not build: Inductor if it compiles here (on CPU it needs a working
    C++ compiler too, so a broken $CXX usually fails both), else the reference. Said once."""
    why = _native.build_error()
    if inductor_works():
        warnings.warn(f"tdm_fast: native CPU kernels unavailable, using torch.compile instead: {why}", stacklevel=5)
        return "compile"
    warnings.warn(
        f"tdm_fast: native CPU kernels and torch.compile both unavailable, using the (slower) reference "
        f"torch kernels: {why}",
        stacklevel=5,
    )
    return "torch"


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


@functools.cache
def inductor_works() -> bool:
    """Whether Inductor compiles a trivial function here. Its graph caches are off for the probe: a
    hit would skip the C++ compiler that the real ops' first compile needs."""
    try:
        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            return bool(torch.compile(_probe, fullgraph=True)(torch.ones(2)).eq(3.0).all())
    except RuntimeError:  # InductorError, InvalidCxxCompiler, CppCompileError: the backend is unusable
        return False


@triton.jit
def row_chunk(pid, n_chunks, D, BLOCK: tl.constexpr):
    """The launch geometry of every fused op: program ``pid`` covers one BLOCK-sized chunk of one sample.

    Returns the sample index, the chunk's int64 offsets within the sample, their in-bounds mask and
    the sample's int64 base offset (B * D can exceed 2^31 for video latents).
    """
    b = pid // n_chunks
    offs = (pid % n_chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b, offs, offs < D, b.to(tl.int64) * D


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tl_compute_dtype(x: torch.Tensor):
    return triton.language.float64 if x.dtype == torch.float64 else triton.language.float32


def rows(t: torch.Tensor) -> torch.Tensor:
    """(B, D) contiguous view of a (B, ...) tensor; copies only when the input is strided."""
    return t.contiguous().view(t.shape[0], -1)


def block_size(d: int, device: torch.device | None = None) -> int:
    """Elements of one sample that one program covers.

    The interpreter pays ~1.5 ms per program instance and vectorises inside one, so it wants one
    program per sample. On a GPU, 512-element programs were as fast as or faster than 1,024-4,096
    for both fused losses at the SD1.5, SDXL and video shapes (bench/gpu_block_sweep.py on an H200,
    in bench/RESULTS.md): more programs in flight hide more memory latency.
    """
    if interpreting() or device is None or device.type != "cuda":
        return min(1 << 16, triton.next_power_of_2(d))
    return min(512, triton.next_power_of_2(d))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# Inductor by default materialises an intermediate that feeds both a reduction and a stored output
# (e.g. sqrt(u² + c²) feeding the loss sum and the gradient): a full-size temporary and an extra
# pass over memory. Recomputing it is free next to the memory traffic, so never realise early.
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1000, "realize_reads_threshold": 1000, "aggressive_fusion": True}


@functools.cache
def compiled(fn):
    """torch.compile(fn), built once; Dynamo then keeps one graph per dtype/shape class it meets."""
    return torch.compile(fn, fullgraph=True, options=_INDUCTOR_OPTIONS)

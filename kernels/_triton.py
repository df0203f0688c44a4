"""Triton, imported on the first launch of a Triton kernel instead of with the package.

Triton ships Linux wheels only: on macOS and Windows ``tdm_fast.kernels`` runs its native, Inductor
and reference backends without it. The kernels are module-level functions marked with ``jit`` below,
which keeps the function and calls ``triton.jit`` on its first launch. That is also when Triton reads
``TRITON_INTERPRET`` (interpreter or compiler), so it must be set before the first launch, not
necessarily before the import.
"""
from __future__ import annotations

import functools
import os
import types
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the kernels' ``tl``; bound for real by ``Kernel.jitted``
    import triton.language as tl

MISSING = "the Triton kernels need the triton package, which is not installed (Triton ships Linux wheels only)"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _imported():
    """The triton package, or None where it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def available() -> bool:
    return _imported() is not None


def load():
    """The triton package; ImportError where it is not installed."""
    triton = _imported()
    if triton is None:
        raise ImportError(MISSING, name="triton")
    return triton


class Kernel:
    """A Triton kernel, or a device function kernels call, jitted on its first launch.

    Triton looks up the names a kernel reads in the function's globals when it compiles (or, under
    the interpreter, runs) it. The kernels' modules do not import triton, so the jitted copy gets
    its module's globals with ``tl`` bound to ``triton.language`` and each ``Kernel`` it calls
    replaced by that kernel's jitted form. The module itself is left as it is.
    """

    def __init__(self, fn):
        self.fn = fn

    @functools.cached_property
    def jitted(self):
        triton = load()
        scope = dict(self.fn.__globals__, tl=triton.language)
        for name in self.fn.__code__.co_names:
            callee = scope.get(name)
            if isinstance(callee, Kernel) and callee is not self:
                scope[name] = callee.jitted
        fn = types.FunctionType(self.fn.__code__, scope, self.fn.__name__, self.fn.__defaults__, self.fn.__closure__)
        fn.__qualname__, fn.__annotations__ = self.fn.__qualname__, self.fn.__annotations__
        return triton.jit(fn)

    def __getitem__(self, grid):
        return self.jitted[grid]


jit = Kernel


@jit
def row_chunk(pid, n_chunks, D, BLOCK: tl.constexpr):
    """The launch geometry of every fused op: program ``pid`` covers one BLOCK-sized chunk of one sample.

    Returns the sample index, the chunk's int64 offsets within the sample, their in-bounds mask and
    the sample's int64 base offset (B * D can exceed 2^31 for video latents).
    """
    b = pid // n_chunks
    offs = (pid % n_chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b, offs, offs < D, b.to(tl.int64) * D


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_size(d: int, device: torch.device | None = None) -> int:
    """Elements of one sample that one program covers.

    The interpreter pays ~1.5 ms per program instance and vectorises inside one, so it wants one
    program per sample. On a GPU, 512-element programs were as fast as or faster than 1,024-4,096
    for both fused losses at the SD1.5, SDXL and video shapes (bench/gpu_block_sweep.py on an H200,
    in bench/RESULTS.md): more programs in flight hide more memory latency.
    """
    if interpreting() or device is None or device.type != "cuda":
        return min(1 << 16, next_power_of_2(d))
    return min(512, next_power_of_2(d))


def chunks(d: int, device: torch.device, block: int | None = None) -> tuple[int, int]:
    """(block, programs per sample) for samples of ``d`` elements; ``block`` None: ``block_size``'s."""
    block = block or block_size(d, device)
    return block, -(-d // block)


def compute_type(x: torch.Tensor):
    """The Triton dtype the kernels compute ``x`` in: float64 for float64, float32 otherwise."""
    language = load().language
    return language.float64 if x.dtype == torch.float64 else language.float32


def options(x: torch.Tensor, block: int) -> dict:
    """The launch keywords every row kernel takes: its compute dtype, block and warp count."""
    return {"COMPUTE": compute_type(x), "BLOCK": block, "num_warps": 8 if block >= 2048 else 4}

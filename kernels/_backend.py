"""The one place a call's backend is chosen, and the torch-side helpers the fused ops share.

Backends, the values of ``TDM_FAST_KERNELS``, each with one meaning in every op:
``triton`` the @triton.jit kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1; see ``_triton``);
``native`` the same single-pass loops in C++, built on first use (``_native``; the measured fastest on
CPU, see bench/bench_kernels.py); ``compile`` the same formulation in torch, compiled by Inductor (the
CPU fallback where no compiler builds the native loops); ``torch`` the reference, ``reference.py`` (the
fallback where Inductor does not work either, and what calls too small to pay for a fused call get).

Each public op asks ``for_call`` once per call. In eager mode that is ``select_backend``'s choice: the
op runs the reference itself for ``torch`` and passes any other name to its custom operator. Under
``torch.compile`` it is "": the operator calls ``select_backend`` when it runs, because the choice
reads the environment and probes compilers, which Dynamo does not trace.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from . import _native, _triton
from ._triton import interpreting

BACKENDS = ("triton", "native", "compile", "torch")
ENV = "TDM_FAST_KERNELS"


# Below these sizes (elements per call) a CPU call is cheaper in the eager reference than through
# the ~0.1 ms fixed cost of a compiled Inductor call (Dynamo guards, validation); measured with
# bench/bench_kernels.py-style timing on a 2-core x86 box, one torch thread. The generator loss's
# fused form wins at every size (its reference runs ~25 ops forward and backward). A native call
# costs ~20 µs of Python and ctypes: only the DDIM jump's reference (two ops) is cheaper below 2^15.
COMPILE_MIN_NUMEL = {"tdm_generator_loss": 0, "renoise": 1 << 15, "fake_score_loss": 1 << 15, "ddim_jump": 1 << 17}
NATIVE_MIN_NUMEL = {"ddim_jump": 1 << 15}


def select_backend(x: torch.Tensor, op: str | None = None) -> str:
    """The backend a call of ``op`` (a public op's name) with ``x`` as its leading tensor would use:
    'triton', 'native', 'compile' or 'torch'."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        return _forced(forced, x)
    if x.device.type == "cuda":
        return cuda_backend()
    if x.device.type == "cpu":
        fused = cpu_backend()
        if fused == "torch":
            return "torch"
        threshold = (NATIVE_MIN_NUMEL if fused == "native" else COMPILE_MIN_NUMEL).get(op, 0)
        return "torch" if x.numel() < threshold else fused
    return "torch"


def for_call(op: str, x: torch.Tensor, grad_inputs: tuple[torch.Tensor, ...] = ()) -> str:
    """The backend of one call of the public op ``op``: ``select_backend``'s choice in eager mode, ""
    under torch.compile (the custom operator chooses when it runs), and ``torch`` for a call that needs
    the gradient of one of ``grad_inputs`` (given by the ops whose fused forms have no backward)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in grad_inputs):
        return "torch"
    return "" if torch.compiler.is_compiling() else select_backend(x, op)


def _forced(name: str, x: torch.Tensor) -> str:
    """``TDM_FAST_KERNELS``'s value, once it is known to run ``x`` here."""
    if name not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "triton" and not _triton.available():
        raise ValueError(f"{ENV}=triton: {_triton.MISSING}; set {ENV} to native, compile or torch")
    if name == "triton" and x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 set before the first launch")
    if name == "native" and x.device.type != "cpu":
        raise RuntimeError(f"{ENV}=native runs CPU tensors only, got {x.device} tensors")
    return name


@functools.cache
def cuda_backend() -> str:
    """The fused backend CUDA tensors get: Triton where it is installed, else the reference. Said once."""
    if _triton.available():
        return "triton"
    warnings.warn(f"tdm_fast: {_triton.MISSING}; CUDA tensors use the (slower) reference torch kernels", stacklevel=5)
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


def reference_and_gradient(loss_fn, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend inside a loss's custom operator: the reference loss and its gradient
    w.r.t. ``x`` for grad_output 1, both in forward, which is the contract of the fused backends
    (the operator's backward only rescales the stored gradient)."""
    # The operator can run under inference mode (a compiled step inside it), where no graph is
    # recorded and an inference tensor cannot become a leaf.
    with torch.inference_mode(False), torch.enable_grad():
        leaf = (x.clone() if x.is_inference() else x.detach()).requires_grad_()
        loss = loss_fn(leaf, *args)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad.contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rows(t: torch.Tensor) -> torch.Tensor:
    """(B, D) contiguous view of a (B, ...) tensor; copies only when the input is strided."""
    return t.contiguous().view(t.shape[0], -1)


# Inductor by default materialises an intermediate that feeds both a reduction and a stored output
# (e.g. sqrt(u² + c²) feeding the loss sum and the gradient): a full-size temporary and an extra
# pass over memory. Recomputing it is free next to the memory traffic, so never realise early.
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1000, "realize_reads_threshold": 1000, "aggressive_fusion": True}


@functools.cache
def compiled(fn):
    """torch.compile(fn), built once; Dynamo then keeps one graph per dtype/shape class it meets."""
    return torch.compile(fn, fullgraph=True, options=_INDUCTOR_OPTIONS)

"""Fused deterministic DDIM jump ``α_next x̂0 + σ_next ε̂`` (spec §2) for the rollout and the sampler;
everything the op is, from its Triton kernel to its public function.

Both run without gradients, so the operator has no backward: calls that need gradients run the
reference. The fusion saves the reference's temporaries and, for half-precision inputs, its separate
upcast passes (see bench/bench_kernels.py for the measured gain).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _backend, _native, _triton, _validate, reference
from ._triton import row_chunk

if TYPE_CHECKING:  # the kernel's ``tl``; bound for real by ``_triton.Kernel.jitted``
    import triton.language as tl

OP = "ddim_jump"


# ------------------------------------------------------------------------------ Triton
@_triton.jit
def _ddim_jump_kernel(
    x0_ptr, eps_ptr, out_ptr, coef_ptr,
    D, n_chunks, B,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, offs, mask, base = row_chunk(pid, n_chunks, D, BLOCK)
    alpha = tl.load(coef_ptr + b)
    sigma = tl.load(coef_ptr + B + b)
    x = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    e = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    tl.store(out_ptr + base + offs, (alpha * x + sigma * e).to(out_ptr.dtype.element_ty), mask=mask)


def _coefficients(x, alpha_next, sigma_next):
    cd = _backend.compute_dtype(x)
    return torch.stack([alpha_next.to(cd), sigma_next.to(cd)])


def _launch_triton(x0, eps, alpha_next, sigma_next, block=None):
    x, e = _backend.rows(x0), _backend.rows(eps)
    batch, d = x.shape
    block, n_chunks = _triton.chunks(d, x.device, block)
    out = torch.empty_like(x)
    _ddim_jump_kernel[(batch * n_chunks,)](
        x, e, out, _coefficients(x, alpha_next, sigma_next), d, n_chunks, batch, **_triton.options(x, block),
    )
    return out


# ------------------------------------------------------------------------------ Inductor
def _ddim_rows(x, e, alpha_next, sigma_next):
    alpha, sigma = (c.unsqueeze(1) for c in _coefficients(x, alpha_next, sigma_next))
    return (alpha * x.to(alpha.dtype) + sigma * e.to(alpha.dtype)).to(x.dtype)


def _launch_compile(x0, eps, alpha_next, sigma_next):
    return _backend.compiled(_ddim_rows)(_backend.rows(x0), _backend.rows(eps), alpha_next, sigma_next)


# ------------------------------------------------------------------------------ native C++
_NATIVE = r"""
// table: (2, B) float64 alpha_next, sigma_next.
template <class T>
static int ddim_jump(const T* x0, const T* eps, const double* table, T* out, i64 B, i64 D, int n_threads) {
    using C = acc_t<T>;
    const Tiles tiles(B, D);
    #pragma omp parallel for schedule(static) num_threads(tiles.threads(n_threads))
    for (i64 t = 0; t < tiles.total; t++)
        for (i64 ch = tiles.first(t); ch < tiles.end(t); ch++) {
            const C alpha = (C)table[tiles.row(ch)], sigma = (C)table[B + tiles.row(ch)];
            const i64 hi = tiles.hi(ch);
            #pragma omp simd
            for (i64 i = tiles.lo(ch); i < hi; i++) st(out, i, alpha * ld<C>(x0, i) + sigma * ld<C>(eps, i));
        }
    return 0;
}

#define EXPORT(sfx, T)                                                                                \
    extern "C" int ddim_jump_##sfx(const void* x0, const void* eps, const double* table, void* out,  \
                                   i64 B, i64 D, int n_threads) {                                     \
        return ddim_jump<T>((const T*)x0, (const T*)eps, table, (T*)out, B, D, n_threads);           \
    }
TDM_FOR_DTYPES(EXPORT)
"""
_NATIVE_ARGS = (*[_native.PTR] * 4, _native.I64, _native.I64, _native.INT)


def _launch_native(x0, eps, alpha_next, sigma_next):
    x, e = x0.contiguous(), eps.contiguous()
    table = _native.table(alpha_next, sigma_next)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _native.check(_native.kernel(_NATIVE, "ddim_jump", x.dtype, _NATIVE_ARGS)(
        x.data_ptr(), e.data_ptr(), table.data_ptr(), out.data_ptr(), x.shape[0], x.numel() // x.shape[0],
        _native.threads(),
    ))
    return out


_LAUNCHERS = {"triton": _launch_triton, "native": _launch_native, "compile": _launch_compile, "torch": reference.ddim_jump}


# ------------------------------------------------------------------------------ custom operator
@torch.library.custom_op("tdm_fast::ddim_jump", mutates_args=())
def _operator(x0: Tensor, eps: Tensor, alpha_next: Tensor, sigma_next: Tensor, backend: str) -> Tensor:
    """``x_next``. ``backend`` "": chosen here, when the operator runs (torch.compile)."""
    backend = backend or _backend.select_backend(x0, OP)
    return _LAUNCHERS[backend](x0, eps, alpha_next, sigma_next).reshape(x0.shape).contiguous()


@_operator.register_fake
def _(x0, eps, alpha_next, sigma_next, backend):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------ public op
def ddim_jump(x0, eps, alpha_next, sigma_next):
    """The deterministic DDIM jump ``α_next x̂0 + σ_next ε̂``; scalars are (B,) tensors."""
    alpha_next, sigma_next = _validate.ddim_jump_args(x0, eps, alpha_next, sigma_next)
    backend = _backend.for_call(OP, x0, grad_inputs=(x0, eps, alpha_next, sigma_next))
    if backend == "torch":
        return reference.ddim_jump(x0, eps, alpha_next, sigma_next)
    return torch.ops.tdm_fast.ddim_jump(x0, eps, alpha_next, sigma_next, backend)

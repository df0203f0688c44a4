"""Fused noisy-sample matching (spec §4): ``x_tau`` and the per-sample ``log_w`` in one read of
``x0, eps, z``; everything the op is, from its Triton kernel to its public function.

Both outputs are linear/quadratic in the inputs with per-sample coefficients, worked out from the
(4, B) table of α_s, σ_s, α_τ, σ_τ inside the kernel, which then does two fused multiply-adds and a
sum of squares per element:
``x_tau = α_τ x0 + (α_τ σ_s/α_s) eps + β z`` and ``log_w = ½ mean_d(z² − ε_mix²)``.
The trainer calls renoise on detached inputs, so the operator has no backward: calls that need
gradients run the reference.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _backend, _native, _triton, _validate, reference
from ._triton import row_chunk

if TYPE_CHECKING:  # the kernel's ``tl``; bound for real by ``_triton.Kernel.jitted``
    import triton.language as tl

OP = "renoise"


# ------------------------------------------------------------------------------ Triton
@_triton.jit
def _renoise_kernel(
    x0_ptr, eps_ptr, z_ptr, out_ptr, partial_ptr, table_ptr,
    D, n_chunks, B, log_w_scale,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, offs, mask, base = row_chunk(pid, n_chunks, D, BLOCK)
    # The per-sample coefficients are recomputed by every program of the sample: four scalar loads
    # and a sqrt, cheaper than the launches of computing them once in torch.
    a_s = tl.load(table_ptr + b).to(COMPUTE)
    s_s = tl.load(table_ptr + B + b).to(COMPUTE)
    a_tau = tl.load(table_ptr + 2 * B + b).to(COMPUTE)
    s_tau = tl.load(table_ptr + 3 * B + b).to(COMPUTE)
    c_eps = a_tau / a_s * s_s
    beta = tl.sqrt(s_tau * s_tau - c_eps * c_eps)
    inv_sigma_tau = 1.0 / s_tau
    x = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    e = tl.load(eps_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    noise = c_eps * e + beta * z
    tl.store(out_ptr + base + offs, (a_tau * x + noise).to(out_ptr.dtype.element_ty), mask=mask)
    eps_mix = noise * inv_sigma_tau
    # Masked lanes load zeros, so they add nothing to the sum.
    tl.store(partial_ptr + pid, tl.sum(z * z - eps_mix * eps_mix, axis=0) * log_w_scale)


def _launch_triton(x0, eps, z, scalars, block=None):
    table = torch.stack(scalars)
    _validate.raise_if_bad_transition(*_validate.transition_ok(*table.to("cpu").unbind()))
    x, e, zz = (_backend.rows(t) for t in (x0, eps, z))
    batch, d = x.shape
    block, n_chunks = _triton.chunks(d, x.device, block)
    out = torch.empty_like(x)
    partial = torch.empty(batch * n_chunks, dtype=_backend.compute_dtype(x), device=x.device)
    _renoise_kernel[(batch * n_chunks,)](
        x, e, zz, out, partial, table, d, n_chunks, batch, 0.5 / d, **_triton.options(x, block),
    )
    log_w = partial if n_chunks == 1 else partial.view(batch, n_chunks).sum(dim=1)
    return out, log_w


# ------------------------------------------------------------------------------ Inductor
def coefficients(x0, a_s, s_s, a_t, s_t):
    """Per-sample α_τ, α_τσ_s/α_s, β, 1/σ_τ (compute dtype) from the (B,) α_s, σ_s, α_τ, σ_τ."""
    a_s, s_s, a_t, s_t = (v.to(_backend.compute_dtype(x0)) for v in (a_s, s_s, a_t, s_t))
    c_eps = a_t / a_s * s_s
    beta = torch.sqrt(s_t * s_t - c_eps * c_eps)
    return a_t, c_eps, beta, 1.0 / s_t


def _renoise_rows(x, e, z, a_s, s_s, a_t, s_t):
    a_tau, c_eps, beta, inv_sigma_tau = (c.unsqueeze(1) for c in coefficients(x, a_s, s_s, a_t, s_t))
    z = z.to(c_eps.dtype)
    noise = c_eps * e.to(c_eps.dtype) + beta * z
    eps_mix = noise * inv_sigma_tau
    x_tau = (a_tau * x.to(c_eps.dtype) + noise).to(x.dtype)
    return x_tau, (z * z - eps_mix * eps_mix).sum(dim=1) * (0.5 / x.shape[1]), *_validate.transition_ok(a_s, s_s, a_t, s_t)


def _launch_compile(x0, eps, z, scalars):
    # The transition check is part of the one compiled call; its flags are read (the host sync)
    # only after the call.
    out, log_w, ok, alpha_s_zero = _backend.compiled(_renoise_rows)(*(_backend.rows(t) for t in (x0, eps, z)), *scalars)
    _validate.raise_if_bad_transition(ok, alpha_s_zero)
    return out, log_w


# ------------------------------------------------------------------------------ native C++
_NATIVE = r"""
// table: (4, B) float64 alpha_s, sigma_s, alpha_tau, sigma_tau. Returns 2 for a transition that
// fails sigma_tau^2 > (alpha_tau sigma_s / alpha_s)^2 (checked in float64 first, like transition_ok),
// 3 for alpha_s = 0; nothing is written then.
template <class T>
static int renoise(const T* x0, const T* eps, const T* z, const double* table, T* out, acc_t<T>* log_w,
                   i64 B, i64 D, int n_threads) {
    using C = acc_t<T>;
    for (i64 b = 0; b < B; b++) {
        const double a_s = table[b], s_s = table[B + b], a_t = table[2 * B + b], s_t = table[3 * B + b];
        if (a_s == 0.0) return 3;
        if (!((s_t * a_s) * (s_t * a_s) > (a_t * s_s) * (a_t * s_s))) return 2;
    }
    const Tiles tiles(B, D);
    double* part = (double*)std::malloc(sizeof(double) * tiles.chunks);
    if (!part) return 1;
    #pragma omp parallel for schedule(static) num_threads(tiles.threads(n_threads))
    for (i64 t = 0; t < tiles.total; t++)
        for (i64 ch = tiles.first(t); ch < tiles.end(t); ch++) {
            const i64 b = tiles.row(ch), hi = tiles.hi(ch);
            const double a_s = table[b], s_s = table[B + b], a_t = table[2 * B + b], s_t = table[3 * B + b];
            const double c_eps64 = a_t / a_s * s_s;
            const C alpha = (C)a_t, c_eps = (C)c_eps64, inv_s = (C)(1.0 / s_t);
            const C beta = (C)std::sqrt(s_t * s_t - c_eps64 * c_eps64);
            double acc = 0.0;
            #pragma omp simd reduction(+:acc)
            for (i64 i = tiles.lo(ch); i < hi; i++) {
                const C zi = ld<C>(z, i), noise = c_eps * ld<C>(eps, i) + beta * zi, mix = noise * inv_s;
                st(out, i, alpha * ld<C>(x0, i) + noise);
                acc += zi * zi - mix * mix;
            }
            part[ch] = acc;
        }
    for (i64 b = 0; b < B; b++) log_w[b] = (C)(0.5 * tiles.row_sum(part, b) / D);
    std::free(part);
    return 0;
}

#define EXPORT(sfx, T)                                                                                 \
    extern "C" int renoise_##sfx(const void* x0, const void* eps, const void* z, const double* table, \
                                 void* out, void* log_w, i64 B, i64 D, int n_threads) {               \
        return renoise<T>((const T*)x0, (const T*)eps, (const T*)z, table, (T*)out,                   \
                          (acc_t<T>*)log_w, B, D, n_threads);                                          \
    }
TDM_FOR_DTYPES(EXPORT)
"""
_NATIVE_ARGS = (*[_native.PTR] * 6, _native.I64, _native.I64, _native.INT)


def _launch_native(x0, eps, z, scalars):
    x, e, zz = (t.contiguous() for t in (x0, eps, z))
    table = _native.table(*scalars)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    log_w = torch.empty(x.shape[0], dtype=_backend.compute_dtype(x))
    rc = _native.kernel(_NATIVE, "renoise", x.dtype, _NATIVE_ARGS)(
        x.data_ptr(), e.data_ptr(), zz.data_ptr(), table.data_ptr(), out.data_ptr(), log_w.data_ptr(),
        x.shape[0], x.numel() // x.shape[0], _native.threads(),
    )
    if rc in (2, 3):
        _validate.raise_if_bad_transition(False, rc == 3)
    _native.check(rc)
    return out, log_w


# ------------------------------------------------------------------------------ reference
def _launch_reference(x0, eps, z, scalars):
    """The reference after the transition check; differentiable, so also the public op's path for
    calls that need gradients."""
    _validate.raise_if_bad_transition(*_validate.transition_ok(*scalars))
    return reference.renoise(x0, eps, z, *scalars)


_LAUNCHERS = {"triton": _launch_triton, "native": _launch_native, "compile": _launch_compile, "torch": _launch_reference}


# ------------------------------------------------------------------------------ custom operator
@torch.library.custom_op("tdm_fast::renoise", mutates_args=())
def _operator(x0: Tensor, eps: Tensor, z: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_tau: Tensor,
              sigma_tau: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(x_tau, log_w) of noisy-sample matching; raises ValueError for an invalid transition.
    ``backend`` "": chosen here, when the operator runs (torch.compile)."""
    backend = backend or _backend.select_backend(x0, OP)
    out, log_w = _LAUNCHERS[backend](x0, eps, z, (alpha_s, sigma_s, alpha_tau, sigma_tau))
    return out.reshape(x0.shape).contiguous(), log_w


@_operator.register_fake
def _(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau, backend):
    return (torch.empty_like(x0, memory_format=torch.contiguous_format),
            x0.new_empty((x0.shape[0],), dtype=_backend.compute_dtype(x0)))


# ------------------------------------------------------------------------------ public op
def renoise(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau):
    """Noisy-sample matching (spec §4): ``(x_tau, log_w)``; scalars are (B,) tensors."""
    scalars = _validate.renoise_args(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau)
    backend = _backend.for_call(OP, x0, grad_inputs=(x0, eps, z, *scalars))
    if backend == "torch":
        return _launch_reference(x0, eps, z, scalars)
    return torch.ops.tdm_fast.renoise(x0, eps, z, *scalars, backend)

"""Fused fake-score loss (spec §3 step 2): ``mean_b[min(SNR_b, cap) w_b mean_d (d_fake − x̂0)²]``;
everything the op is, from its Triton kernel to its public function.

The per-sample weight ``min(SNR, cap) w_b`` does not depend on the big tensors, so it is computed
first and one read of ``d_fake`` and ``x0_target`` gives both the per-sample squared error and the
finished gradient ``2 (d_fake − x̂0) min(SNR, cap) w_b / (B D)``; backward only rescales it by
grad_output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _backend, _native, _triton, _validate, reference
from ._triton import row_chunk
from .reference import importance_weights

if TYPE_CHECKING:  # the kernel's ``tl``; bound for real by ``_triton.Kernel.jitted``
    import triton.language as tl

OP = "fake_score_loss"


# ------------------------------------------------------------------------------ Triton
@_triton.jit
def _fake_score_loss_kernel(
    d_ptr, t_ptr, grad_ptr, partial_ptr, scale_ptr,
    D, n_chunks,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, offs, mask, base = row_chunk(pid, n_chunks, D, BLOCK)
    scale = tl.load(scale_ptr + b)
    diff = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE) - tl.load(
        t_ptr + base + offs, mask=mask, other=0.0
    ).to(COMPUTE)
    tl.store(grad_ptr + base + offs, (scale * diff).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(diff * diff, axis=0))


def _weights(snr_tau, log_w, snr_cap, dtype):
    return snr_tau.to(dtype).clamp(max=snr_cap) * importance_weights(log_w).to(dtype)


def _launch_triton(d_fake, x0_target, snr_tau, log_w, snr_cap, block=None):
    d, t = _backend.rows(d_fake), _backend.rows(x0_target)
    batch, size = d.shape
    weight = _weights(snr_tau, log_w, snr_cap, _backend.compute_dtype(d))
    block, n_chunks = _triton.chunks(size, d.device, block)
    grad = torch.empty_like(d)
    partial = torch.empty(batch * n_chunks, dtype=weight.dtype, device=d.device)
    _fake_score_loss_kernel[(batch * n_chunks,)](
        d, t, grad, partial, (weight * (2.0 / (batch * size))).contiguous(), size, n_chunks, **_triton.options(d, block),
    )
    sq = partial.view(batch, n_chunks).sum(dim=1)
    return grad, (weight * sq).mean() / size


# ------------------------------------------------------------------------------ Inductor
def _fake_score_rows(d, t, snr_tau, log_w, snr_cap):
    batch, size = d.shape
    weight = _weights(snr_tau, log_w, snr_cap, snr_cap.dtype)
    diff = d.to(weight.dtype) - t.to(weight.dtype)
    grad = diff * (weight * (2.0 / (batch * size))).unsqueeze(1)
    return grad.to(d.dtype), (weight * (diff * diff).sum(dim=1)).mean() / size


def _launch_compile(d_fake, x0_target, snr_tau, log_w, snr_cap):
    # snr_cap goes in as a tensor so that changing it does not recompile.
    cap = torch.tensor(snr_cap, dtype=_backend.compute_dtype(d_fake), device=d_fake.device)
    return _backend.compiled(_fake_score_rows)(_backend.rows(d_fake), _backend.rows(x0_target), snr_tau, log_w, cap)


# ------------------------------------------------------------------------------ native C++
_NATIVE = r"""
// table: (2, B) float64 snr_tau, log_w. The weights min(SNR, cap) * B softmax(log_w) come first (B
// scalars), then one pass writes the finished gradient and the per-tile squared errors.
template <class T>
static int fake_score_loss(const T* d, const T* target, const double* table, T* grad, i64 B, i64 D,
                           double snr_cap, int n_threads, acc_t<T>* loss) {
    using C = acc_t<T>;
    const Tiles tiles(B, D);
    double* part = (double*)std::malloc(sizeof(double) * (tiles.chunks + B));
    if (!part) return 1;
    double* weight = part + tiles.chunks;
    double top = table[B], sum = 0.0;
    for (i64 b = 1; b < B; b++) top = std::fmax(top, table[B + b]);
    for (i64 b = 0; b < B; b++) sum += (weight[b] = std::exp(table[B + b] - top));
    for (i64 b = 0; b < B; b++) weight[b] = std::fmin(table[b], snr_cap) * weight[b] / sum * B;
    #pragma omp parallel for schedule(static) num_threads(tiles.threads(n_threads))
    for (i64 t = 0; t < tiles.total; t++)
        for (i64 ch = tiles.first(t); ch < tiles.end(t); ch++) {
            const C scale = (C)(weight[tiles.row(ch)] * 2.0 / ((double)B * D));
            const i64 hi = tiles.hi(ch);
            double acc = 0.0;
            #pragma omp simd reduction(+:acc)
            for (i64 i = tiles.lo(ch); i < hi; i++) {
                const C diff = ld<C>(d, i) - ld<C>(target, i);
                st(grad, i, scale * diff);
                acc += diff * diff;
            }
            part[ch] = acc;
        }
    double total = 0.0;
    for (i64 b = 0; b < B; b++) total += weight[b] * tiles.row_sum(part, b);
    *loss = (acc_t<T>)(total / ((double)B * D));
    std::free(part);
    return 0;
}

#define EXPORT(sfx, T)                                                                                 \
    extern "C" int fake_score_loss_##sfx(const void* d, const void* target, const double* table, void* grad, \
                                         i64 B, i64 D, double cap, int n_threads, void* loss) {             \
        return fake_score_loss<T>((const T*)d, (const T*)target, table, (T*)grad, B, D, cap, n_threads,      \
                                  (acc_t<T>*)loss);                                                          \
    }
TDM_FOR_DTYPES(EXPORT)
"""
_NATIVE_ARGS = (*[_native.PTR] * 4, _native.I64, _native.I64, _native.F64, _native.INT, _native.PTR)


def _launch_native(d_fake, x0_target, snr_tau, log_w, snr_cap):
    d, t = d_fake.contiguous(), x0_target.contiguous()
    table = _native.table(snr_tau, log_w)
    grad = torch.empty_like(d, memory_format=torch.contiguous_format)
    loss = torch.empty((), dtype=_backend.compute_dtype(d))
    _native.check(_native.kernel(_NATIVE, "fake_score_loss", d.dtype, _NATIVE_ARGS)(
        d.data_ptr(), t.data_ptr(), table.data_ptr(), grad.data_ptr(), d.shape[0], d.numel() // d.shape[0], snr_cap,
        _native.threads(), loss.data_ptr(),
    ))
    return grad, loss


# ------------------------------------------------------------------------------ reference
def _launch_reference(d_fake, x0_target, snr_tau, log_w, snr_cap):
    loss, grad = _backend.reference_and_gradient(reference.fake_score_loss, d_fake, x0_target, snr_tau, log_w, snr_cap)
    return grad, loss


_LAUNCHERS = {"triton": _launch_triton, "native": _launch_native, "compile": _launch_compile, "torch": _launch_reference}


# ------------------------------------------------------------------------------ custom operator
@torch.library.custom_op("tdm_fast::fake_score_loss", mutates_args=())
def _operator(d_fake: Tensor, x0_target: Tensor, snr_tau: Tensor, log_w: Tensor, snr_cap: float,
              backend: str) -> tuple[Tensor, Tensor]:
    """(loss, finished gradient w.r.t. d_fake for grad_output 1). ``backend`` "": chosen here, when
    the operator runs (torch.compile)."""
    backend = backend or _backend.select_backend(d_fake, OP)
    grad, loss = _LAUNCHERS[backend](d_fake, x0_target, snr_tau, log_w, snr_cap)
    return loss, grad.reshape(d_fake.shape)


@_operator.register_fake
def _(d_fake, x0_target, snr_tau, log_w, snr_cap, backend):
    return (d_fake.new_empty((), dtype=_backend.compute_dtype(d_fake)),
            torch.empty_like(d_fake, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _backward(ctx, grad_loss, _grad):
    """The stored gradient times grad_output, out of place (see ``generator_loss.rescale``)."""
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss).to(grad.dtype), None, None, None, None, None


_operator.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public op
def fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap=5.0):
    """Weighted x0-MSE of the fake score (spec §3 step 2); differentiable w.r.t. ``d_fake``."""
    snr_tau, log_w, snr_cap = _validate.fake_score_loss_args(d_fake, x0_target, snr_tau, log_w, snr_cap)
    backend = _backend.for_call(OP, d_fake)
    if backend == "torch":
        return reference.fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap)
    return torch.ops.tdm_fast.fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap, backend)[0]

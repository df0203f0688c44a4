"""Fused TDM generator loss (spec §5): one read of the four inputs gives the per-sample normaliser,
the loss and the gradient w.r.t. x0; everything the op is, from its Triton kernels to its public
function.

The gradient is ``g(d_fake - D_cfg) / (n_b B D)``. ``n_b`` is a reduction over the whole sample, so
it is only known after the sample has been read; rather than read the inputs a second time, the
Triton and Inductor forms store the unscaled ``g`` and the per-sample factor ``1 / (n_b B D)``, and
backward applies that factor together with grad_output in the one rescale it has to do anyway
(``rescale``). The native CPU loop applies the factor in forward instead, tile by tile while the
tile's gradient is still in cache, so its backward only multiplies by grad_output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _backend, _native, _triton, _validate, reference
from ._triton import row_chunk

if TYPE_CHECKING:  # the kernels' ``tl``; bound for real by ``_triton.Kernel.jitted``
    import triton.language as tl

OP = "tdm_generator_loss"


# ------------------------------------------------------------------------------ Triton
@_triton.jit
def _generator_loss_kernel(
    x0_ptr, dc_ptr, du_ptr, df_ptr, grad_ptr, partial_ptr,
    D, n_chunks, n_programs, cfg_scale, huber_c,
    HUBER: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, offs, mask, base = row_chunk(pid, n_chunks, D, BLOCK)
    # Upcast on load: half-precision arithmetic is wrong in the interpreter and lossy on GPU.
    x = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    dc = tl.load(dc_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    du = tl.load(du_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    df = tl.load(df_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    d_cfg = du + cfg_scale * (dc - du)
    u = df - d_cfg
    dist = tl.where(mask, tl.abs(x - d_cfg), 0.0)
    if HUBER:
        r = tl.sqrt(u * u + huber_c * huber_c)
        # u²/(r+c) equals r-c without the cancellation that loses all digits when |u| << c.
        ell = u * u / (r + huber_c)
        g = u / r
    else:
        ell = u * u
        g = 2.0 * u
    tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    # Two-phase reduction: per-program partial sums, summed per sample by the launcher. Deterministic,
    # unlike atomics, and it keeps every sample's reduction independent of the grid shape.
    tl.store(partial_ptr + pid, tl.sum(dist, axis=0))
    tl.store(partial_ptr + n_programs + pid, tl.sum(tl.where(mask, ell, 0.0), axis=0))


@_triton.jit
def _finish_kernel(
    partial_ptr, loss_ptr, scale_ptr, B, D, n_chunks, n_programs,
    NORMALIZE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: per-sample sums of the partials -> n_b, the factor 1/(n_b B D) and the loss.

    One launch instead of half a dozen tiny torch ops: at SDXL sizes on a GPU the main kernel takes
    microseconds, so each extra launch costs a visible share of the op.
    """
    total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        dist = tl.zeros([BLOCK_B], dtype=COMPUTE)
        ell = tl.zeros([BLOCK_B], dtype=COMPUTE)
        for c0 in range(0, n_chunks, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            idx = rows[:, None] * n_chunks + cols[None, :]
            m = (rows[:, None] < B) & (cols[None, :] < n_chunks)
            dist += tl.sum(tl.load(partial_ptr + idx, mask=m, other=0.0), axis=1)
            ell += tl.sum(tl.load(partial_ptr + n_programs + idx, mask=m, other=0.0), axis=1)
        if NORMALIZE:
            norm = tl.maximum(dist / D, 1e-6)
        else:
            norm = tl.full([BLOCK_B], 1.0, COMPUTE)
        tl.store(scale_ptr + rows, 1.0 / (norm * B * D), mask=rows < B)
        total += tl.where(rows < B, ell / (norm * D), 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


@_triton.jit
def _rescale_kernel(grad_ptr, out_ptr, factor_ptr, scale_ptr, D, n_chunks, BLOCK: tl.constexpr):
    """Backward: out = grad * grad_output * scale[b] (out may be grad), grad_output read on the device (no sync)."""
    pid = tl.program_id(0)
    b, offs, mask, base = row_chunk(pid, n_chunks, D, BLOCK)
    f = tl.load(factor_ptr) * tl.load(scale_ptr + b)
    g = tl.load(grad_ptr + base + offs, mask=mask, other=0.0)
    tl.store(out_ptr + base + offs, (g.to(f.dtype) * f).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_triton(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize, block=None, finish_rows=None):
    x, dc, du, df = (_backend.rows(t) for t in (x0, d_cond, d_uncond, d_fake))
    batch, d = x.shape
    block, n_chunks = _triton.chunks(d, x.device, block)
    n_programs = batch * n_chunks
    grad = torch.empty_like(x)
    partial = torch.empty(2, n_programs, dtype=_backend.compute_dtype(x), device=x.device)
    _generator_loss_kernel[(n_programs,)](
        x, dc, du, df, grad, partial, d, n_chunks, n_programs, cfg_scale, 1.0 if huber_c is None else huber_c,
        HUBER=huber_c is not None, **_triton.options(x, block),
    )
    loss = torch.empty((), dtype=partial.dtype, device=x.device)
    scale = torch.empty(batch, dtype=partial.dtype, device=x.device)
    block_c = min(1024, _triton.next_power_of_2(n_chunks))
    _finish_kernel[(1,)](
        partial, loss, scale, batch, d, n_chunks, n_programs, NORMALIZE=normalize, COMPUTE=_triton.compute_type(x),
        BLOCK_B=finish_rows or min(_triton.next_power_of_2(batch), max(1, 4096 // block_c)), BLOCK_C=block_c,
    )
    return grad, loss, scale


def _rescale_triton(grad, grad_output, scale, out):
    """``grad * grad_output * scale[b]`` into ``out``; (B, D) tensors."""
    batch, d = grad.shape
    block, n_chunks = _triton.chunks(d, grad.device)
    _rescale_kernel[(batch * n_chunks,)](
        grad, out, grad_output.to(scale.dtype).contiguous(), scale, d, n_chunks,
        BLOCK=block, num_warps=_triton.options(grad, block)["num_warps"],
    )
    return out


# ------------------------------------------------------------------------------ Inductor
def _finish(dist, ell, batch, d, normalize):
    """Loss and per-sample gradient factor 1/(n_b B D) from the per-sample sums."""
    norm = (dist / d).clamp_min(1e-6) if normalize else torch.ones_like(dist)
    return (ell / (d * norm)).mean(), 1.0 / (norm * (batch * d))


def _huber_rows(x, dc, du, df, scalars, normalize, row_ones):
    cd = scalars.dtype
    cfg_scale, c = scalars[0], scalars[1]
    d_cfg = du.to(cd) + cfg_scale * (dc.to(cd) - du.to(cd))
    u = df.to(cd) - d_cfg
    r = torch.sqrt(u * u + c * c)
    dist = (x.to(cd) - d_cfg).abs().sum(dim=1)
    ell = (u * u / (r + c)).sum(dim=1)
    return ((u / r * row_ones).to(x.dtype), *_finish(dist, ell, x.shape[0], x.shape[1], normalize))


def _mse_rows(x, dc, du, df, scalars, normalize, row_ones):
    cd = scalars.dtype
    d_cfg = du.to(cd) + scalars[0] * (dc.to(cd) - du.to(cd))
    u = df.to(cd) - d_cfg
    dist = (x.to(cd) - d_cfg).abs().sum(dim=1)
    ell = (u * u).sum(dim=1)
    return ((2.0 * u * row_ones).to(x.dtype), *_finish(dist, ell, x.shape[0], x.shape[1], normalize))


def _launch_compile(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize):
    # One compiled call computes the reductions, the gradient and the per-sample epilogue; the
    # scalars travel as a tensor so that a new cfg_scale does not recompile. Multiplying the gradient
    # by a per-row tensor of ones gives it the (B, D) loop shape of the per-row sums, so Inductor
    # stores it from the same loop instead of flattening it into a second pass over the four inputs
    # (measured 1.3-1.5x at the SD1.5/SDXL shapes).
    fn = _backend.compiled(_mse_rows if huber_c is None else _huber_rows)
    cd = _backend.compute_dtype(x0)
    scalars = torch.tensor([cfg_scale, 1.0 if huber_c is None else huber_c], dtype=cd, device=x0.device)
    row_ones = torch.ones(x0.shape[0], 1, dtype=cd, device=x0.device)
    return fn(*(_backend.rows(t) for t in (x0, d_cond, d_uncond, d_fake)), scalars, normalize, row_ones)


# ------------------------------------------------------------------------------ native C++
_NATIVE = r"""
template <class T>
static int generator_loss(const T* x, const T* dc, const T* du, const T* df, T* grad, i64 B, i64 D,
                          double cfg_scale, double huber_c, int huber, int normalize, int n_threads, acc_t<T>* loss) {
    using C = acc_t<T>;
    const Tiles tiles(B, D);
    // Per-chunk sums of |x0 - D_cfg| and of the distance, then the per-sample factors.
    double* dist = (double*)std::malloc(sizeof(double) * (2 * tiles.chunks + B));
    if (!dist) return 1;
    double* ell = dist + tiles.chunks;
    double* scale = ell + tiles.chunks;
    const C cfg = (C)cfg_scale, c = (C)huber_c;
    double total = 0.0;
    #pragma omp parallel num_threads(tiles.threads(n_threads))
    {
        // Same static schedule in both loops: a thread rescales the tiles it wrote, from its cache.
        #pragma omp for schedule(static)
        for (i64 t = 0; t < tiles.total; t++)
            for (i64 ch = tiles.first(t); ch < tiles.end(t); ch++) {
                const i64 lo = tiles.lo(ch), hi = tiles.hi(ch);
                double d_sum = 0.0, e_sum = 0.0;
                if (huber) {
                    #pragma omp simd reduction(+:d_sum, e_sum)
                    for (i64 i = lo; i < hi; i++) {
                        const C u_ = ld<C>(du, i), d_cfg = u_ + cfg * (ld<C>(dc, i) - u_), u = ld<C>(df, i) - d_cfg;
                        const C r = std::sqrt(u * u + c * c);
                        d_sum += std::abs(ld<C>(x, i) - d_cfg);
                        e_sum += u * u / (r + c);  // = r - c without its cancellation when |u| << c
                        st(grad, i, u / r);
                    }
                } else {
                    #pragma omp simd reduction(+:d_sum, e_sum)
                    for (i64 i = lo; i < hi; i++) {
                        const C u_ = ld<C>(du, i), d_cfg = u_ + cfg * (ld<C>(dc, i) - u_), u = ld<C>(df, i) - d_cfg;
                        d_sum += std::abs(ld<C>(x, i) - d_cfg);
                        e_sum += u * u;
                        st(grad, i, (C)2 * u);
                    }
                }
                dist[ch] = d_sum;
                ell[ch] = e_sum;
            }
        #pragma omp single
        for (i64 b = 0; b < B; b++) {
            const double norm = normalize ? std::fmax(tiles.row_sum(dist, b) / D, 1e-6) : 1.0;
            scale[b] = 1.0 / (norm * B * D);
            total += tiles.row_sum(ell, b) / (norm * D);
        }
        #pragma omp for schedule(static)
        for (i64 t = 0; t < tiles.total; t++)
            for (i64 ch = tiles.first(t); ch < tiles.end(t); ch++) {
                const C s = (C)scale[tiles.row(ch)];
                const i64 hi = tiles.hi(ch);
                #pragma omp simd
                for (i64 i = tiles.lo(ch); i < hi; i++) st(grad, i, s * ld<C>(grad, i));
            }
    }
    *loss = (acc_t<T>)(total / B);
    std::free(dist);
    return 0;
}

#define EXPORT(sfx, T)                                                                                       \
    extern "C" int generator_loss_##sfx(const void* x, const void* dc, const void* du, const void* df,       \
                                        void* grad, i64 B, i64 D, double cfg, double c, int huber,           \
                                        int normalize, int n_threads, void* loss) {                          \
        return generator_loss<T>((const T*)x, (const T*)dc, (const T*)du, (const T*)df, (T*)grad, B, D, cfg, \
                                 c, huber, normalize, n_threads, (acc_t<T>*)loss);                           \
    }
TDM_FOR_DTYPES(EXPORT)
"""
_NATIVE_ARGS = (*[_native.PTR] * 5, _native.I64, _native.I64, _native.F64, _native.F64, _native.INT, _native.INT,
                _native.INT, _native.PTR)


def _launch_native(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize):
    """Returns the finished gradient (scale None): see the module docstring."""
    x, dc, du, df = (t.contiguous() for t in (x0, d_cond, d_uncond, d_fake))
    batch = x.shape[0]
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    loss = torch.empty((), dtype=_backend.compute_dtype(x))
    _native.check(_native.kernel(_NATIVE, "generator_loss", x.dtype, _NATIVE_ARGS)(
        x.data_ptr(), dc.data_ptr(), du.data_ptr(), df.data_ptr(), grad.data_ptr(), batch, x.numel() // batch, cfg_scale,
        1.0 if huber_c is None else huber_c, huber_c is not None, normalize, _native.threads(), loss.data_ptr(),
    ))
    return grad, loss, None


# ------------------------------------------------------------------------------ reference
def _launch_reference(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize):
    """The reference, its gradient finished in forward (scale None)."""
    loss, grad = _backend.reference_and_gradient(
        reference.tdm_generator_loss, x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize
    )
    return grad, loss, None


_LAUNCHERS = {"triton": _launch_triton, "native": _launch_native, "compile": _launch_compile, "torch": _launch_reference}


# ------------------------------------------------------------------------------ custom operator
@torch.library.custom_op("tdm_fast::tdm_generator_loss", mutates_args=())
def _operator(
    x0: Tensor, d_cond: Tensor, d_uncond: Tensor, d_fake: Tensor, cfg_scale: float, huber_c: float | None,
    normalize: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stored gradient shaped like x0, per-sample factor): the gradient w.r.t. x0 is
    ``stored * factor[b] * grad_output`` (backends that finish it in forward: factor 1). ``backend``
    "": chosen here, when the operator runs (torch.compile)."""
    backend = backend or _backend.select_backend(x0, OP)
    grad, loss, scale = _LAUNCHERS[backend](x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    if scale is None:
        scale = torch.ones(x0.shape[0], dtype=loss.dtype, device=x0.device)
    return loss, grad.reshape(x0.shape), scale


@_operator.register_fake
def _(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize, backend):
    cd = _backend.compute_dtype(x0)
    return (x0.new_empty((), dtype=cd), torch.empty_like(x0, memory_format=torch.contiguous_format),
            x0.new_empty((x0.shape[0],), dtype=cd))


def _setup_context(ctx, inputs, output):
    _, grad, scale = output
    ctx.save_for_backward(grad, scale)
    ctx.mark_non_differentiable(grad, scale)


def _backward(ctx, grad_loss, _grad, _scale):
    grad, scale = ctx.saved_tensors
    return rescale(grad, grad_loss, scale), None, None, None, None, None, None, None


_operator.register_autograd(_backward, setup_context=_setup_context)


def _traced(t: Tensor) -> bool:
    """Whether ``t`` is being traced (Dynamo, AOTAutograd's functionalised fake tensors) rather than
    holding data."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, FunctionalTensor) or is_fake(t)


def rescale(grad: Tensor, grad_output: Tensor, scale: Tensor) -> Tensor:
    """The whole backward: ``grad[b] * grad_output * scale[b]``, grad_output read on the device so
    the host never waits for it.

    Out of place: the stored gradient is also an output of the forward operator, and an output that a
    later backward changed would make eager and compiled runs disagree; a second backward through a
    retained graph then simply gives the same gradient again. One Triton launch on CUDA, one torch
    multiply elsewhere; traced (torch.compile), the multiply that Inductor fuses into the gradient's
    consumer."""
    if grad.device.type == "cuda" and _triton.available() and not _traced(grad):
        rows = grad.view(grad.shape[0], -1)
        return _rescale_triton(rows, grad_output, scale, out=torch.empty_like(rows)).view(grad.shape)
    shape = (grad.shape[0],) + (1,) * (grad.dim() - 1)
    return (grad * (grad_output * scale).reshape(shape)).to(grad.dtype)


# ------------------------------------------------------------------------------ public op
def tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c=1e-3, normalize=True):
    """The TDM generator loss (spec §5); a scalar differentiable w.r.t. ``x0`` only.

    ``huber_c=None`` uses the MSE instead of the pseudo-Huber distance; ``normalize=False`` drops the
    per-sample normaliser ``n_b``.
    """
    cfg_scale, huber_c = _validate.generator_loss_args(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    backend = _backend.for_call(OP, x0)
    if backend == "torch":
        return reference.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    return torch.ops.tdm_fast.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize, backend)[0]

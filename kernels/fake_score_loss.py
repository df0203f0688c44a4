"""Fused fake-score loss (spec §3 step 2): ``mean_b[min(SNR_b, cap) w_b mean_d (d_fake − x̂0)²]``.

The per-sample weight ``min(SNR, cap) w_b`` does not depend on the big tensors, so it is computed
first and one read of ``d_fake`` and ``x0_target`` gives both the per-sample squared error and the
finished gradient ``2 (d_fake − x̂0) min(SNR, cap) w_b / (B D)``; backward only rescales it by
grad_output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _backend
from .reference import importance_weights


@triton.jit
def _fake_score_loss_kernel(
    d_ptr, t_ptr, grad_ptr, partial_ptr, scale_ptr,
    D, n_chunks,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b, offs, mask, base = _backend.row_chunk(pid, n_chunks, D, BLOCK)
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
    block = block or _backend.block_size(size, d.device)
    n_chunks = triton.cdiv(size, block)
    grad = torch.empty_like(d)
    partial = torch.empty(batch * n_chunks, dtype=weight.dtype, device=d.device)
    _fake_score_loss_kernel[(batch * n_chunks,)](
        d, t, grad, partial, (weight * (2.0 / (batch * size))).contiguous(), size, n_chunks,
        COMPUTE=_backend.tl_compute_dtype(d), BLOCK=block, num_warps=_backend.num_warps(block),
    )
    sq = partial.view(batch, n_chunks).sum(dim=1)
    return grad, (weight * sq).mean() / size


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


_LAUNCHERS = {"triton": _launch_triton, "compile": _launch_compile}


class FakeScoreLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d_fake, x0_target, snr_tau, log_w, snr_cap, backend):
        grad, loss = _LAUNCHERS[backend](d_fake, x0_target, snr_tau, log_w, snr_cap)
        ctx.save_for_backward(grad)
        ctx.d_fake_shape = d_fake.shape
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return _backend.rescale_(grad, grad_output).view(ctx.d_fake_shape), None, None, None, None, None


def fake_score_loss(d_fake, x0_target, snr_tau, log_w, snr_cap, backend):
    """Validated arguments in, scalar loss out; see ``tdm_fast.kernels.fake_score_loss``."""
    return FakeScoreLossFunction.apply(d_fake, x0_target, snr_tau, log_w, snr_cap, backend)

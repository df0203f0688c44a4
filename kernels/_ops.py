"""The four fused ops as PyTorch custom operators, ``torch.ops.tdm_fast.*``, so that ``torch.compile``
traces a training step through them without graph breaks.

Each operator is opaque to Dynamo: its implementation runs the backend the dispatcher picks
(``_backend.select``: Triton, the native C++ loops, the Inductor form, or the torch formulation),
and its fake (meta) implementation states the output shapes and dtypes, which are the same for every
backend. The public functions in ``tdm_fast.kernels`` validate their arguments, pick the backend in
eager mode and pass it in; under ``torch.compile`` they pass ``backend=""`` and the operator picks at
run time (the choice reads the environment and probes compilers, which Dynamo cannot trace).

The losses keep the Liger pattern: the forward operator returns the loss together with the stored
gradient (and, for the generator loss, the per-sample factor ``1/(n_b B D)``); their registered
autograd formula only rescales that gradient by ``grad_output`` (``rescale``: a Triton kernel on
CUDA, one torch multiply elsewhere; under ``torch.compile`` a multiply that Inductor fuses into the
gradient's consumer). ``renoise`` and ``ddim_jump`` have no backward (the trainer calls them on
detached inputs; the public functions send calls that need a gradient to the differentiable
reference).

No ``from __future__ import annotations`` here: the operator schemas are inferred from the
annotations.
"""
import torch
from torch import Tensor

from . import _backend, _validate, reference
from . import ddim_jump as _ddim_jump
from . import fake_score_loss as _fake_score_loss
from . import generator_loss as _generator_loss
from . import renoise as _renoise

NAMESPACE = "tdm_fast"
OPS = ("tdm_generator_loss", "fake_score_loss", "renoise", "ddim_jump")


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _choose(backend: str, x: Tensor, op: str) -> str:
    return backend or _backend.select(x, op)


# ------------------------------------------------------------------------------ generator loss
@torch.library.custom_op("tdm_fast::tdm_generator_loss", mutates_args=())
def tdm_generator_loss(
    x0: Tensor, d_cond: Tensor, d_uncond: Tensor, d_fake: Tensor, cfg_scale: float, huber_c: float | None,
    normalize: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stored gradient shaped like x0, per-sample factor): the gradient w.r.t. x0 is
    ``stored * factor[b] * grad_output`` (the native loop finishes it in forward: factor 1)."""
    backend = _choose(backend, x0, "tdm_generator_loss")
    if backend == "torch":  # the fused formulation in eager torch (reached under torch.compile only)
        cd = _backend.compute_dtype(x0)
        scalars = torch.tensor([cfg_scale, 1.0 if huber_c is None else huber_c], dtype=cd, device=x0.device)
        row_ones = torch.ones(x0.shape[0], 1, dtype=cd, device=x0.device)
        fn = _generator_loss._mse_rows if huber_c is None else _generator_loss._huber_rows
        grad, loss, scale = fn(*(_rows(t) for t in (x0, d_cond, d_uncond, d_fake)), scalars, normalize, row_ones)
    else:
        grad, loss, scale = _generator_loss._LAUNCHERS[backend](x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    if scale is None:
        scale = torch.ones(x0.shape[0], dtype=loss.dtype, device=x0.device)
    return loss, grad.reshape(x0.shape), scale


@tdm_generator_loss.register_fake
def _(x0, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize, backend):
    cd = _backend.compute_dtype(x0)
    return (x0.new_empty((), dtype=cd), torch.empty_like(x0, memory_format=torch.contiguous_format),
            x0.new_empty((x0.shape[0],), dtype=cd))


def _generator_loss_setup(ctx, inputs, output):
    _, grad, scale = output
    ctx.save_for_backward(grad, scale)
    ctx.mark_non_differentiable(grad, scale)


def _generator_loss_backward(ctx, grad_loss, _grad, _scale):
    grad, scale = ctx.saved_tensors
    return rescale(grad, grad_loss, scale), None, None, None, None, None, None, None


torch.library.register_autograd("tdm_fast::tdm_generator_loss", _generator_loss_backward, setup_context=_generator_loss_setup)


# ------------------------------------------------------------------------------ fake-score loss
@torch.library.custom_op("tdm_fast::fake_score_loss", mutates_args=())
def fake_score_loss(d_fake: Tensor, x0_target: Tensor, snr_tau: Tensor, log_w: Tensor, snr_cap: float,
                    backend: str) -> tuple[Tensor, Tensor]:
    """(loss, finished gradient w.r.t. d_fake for grad_output 1)."""
    backend = _choose(backend, d_fake, "fake_score_loss")
    if backend == "torch":
        cap = torch.tensor(snr_cap, dtype=_backend.compute_dtype(d_fake), device=d_fake.device)
        grad, loss = _fake_score_loss._fake_score_rows(_rows(d_fake), _rows(x0_target), snr_tau, log_w, cap)
    else:
        grad, loss = _fake_score_loss._LAUNCHERS[backend](d_fake, x0_target, snr_tau, log_w, snr_cap)
    return loss, grad.reshape(d_fake.shape)


@fake_score_loss.register_fake
def _(d_fake, x0_target, snr_tau, log_w, snr_cap, backend):
    return (d_fake.new_empty((), dtype=_backend.compute_dtype(d_fake)),
            torch.empty_like(d_fake, memory_format=torch.contiguous_format))


def _fake_score_setup(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _fake_score_backward(ctx, grad_loss, _grad):
    (grad,) = ctx.saved_tensors
    return rescale(grad, grad_loss, None), None, None, None, None, None


torch.library.register_autograd("tdm_fast::fake_score_loss", _fake_score_backward, setup_context=_fake_score_setup)


# ------------------------------------------------------------------------------ backward rescale
def _traced(t: Tensor) -> bool:
    """Whether ``t`` is being traced (Dynamo, AOTAutograd's functionalised fake tensors) rather than
    holding data."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, FunctionalTensor) or is_fake(t)


def rescale(grad: Tensor, grad_output: Tensor, scale: Tensor | None) -> Tensor:
    """The whole backward of a fused loss: ``grad[b] * grad_output * scale[b]`` (``scale`` None: 1),
    grad_output read on the device so the host never waits for it.

    Out of place: the stored gradient is also an output of the forward operator, and an output that a
    later backward changed would make eager and compiled runs disagree; a second backward through a
    retained graph then simply gives the same gradient again. One Triton launch on CUDA, one torch
    multiply elsewhere; traced (torch.compile), the multiply that Inductor fuses into the gradient's
    consumer."""
    if scale is not None and grad.device.type == "cuda" and not _traced(grad):
        rows = grad.view(grad.shape[0], -1)
        return _generator_loss._rescale_triton(rows, grad_output, scale, out=torch.empty_like(rows)).view(grad.shape)
    if scale is None:
        return (grad * grad_output).to(grad.dtype)
    shape = (grad.shape[0],) + (1,) * (grad.dim() - 1)
    return (grad * (grad_output * scale).reshape(shape)).to(grad.dtype)


# ------------------------------------------------------------------------------ renoise, ddim_jump
@torch.library.custom_op("tdm_fast::renoise", mutates_args=())
def renoise(x0: Tensor, eps: Tensor, z: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_tau: Tensor, sigma_tau: Tensor,
            backend: str) -> tuple[Tensor, Tensor]:
    """(x_tau, log_w) of noisy-sample matching; raises ValueError for an invalid transition."""
    backend = _choose(backend, x0, "renoise")
    scalars = (alpha_s, sigma_s, alpha_tau, sigma_tau)
    if backend == "torch":
        _validate.raise_if_bad_transition(*_validate.transition_ok(*scalars))
        x_tau, log_w = reference.renoise(x0, eps, z, *scalars)
        return x_tau.contiguous(), log_w
    return _renoise.renoise(x0, eps, z, scalars, backend)


@renoise.register_fake
def _(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau, backend):
    return (torch.empty_like(x0, memory_format=torch.contiguous_format),
            x0.new_empty((x0.shape[0],), dtype=_backend.compute_dtype(x0)))


@torch.library.custom_op("tdm_fast::ddim_jump", mutates_args=())
def ddim_jump(x0: Tensor, eps: Tensor, alpha_next: Tensor, sigma_next: Tensor, backend: str) -> Tensor:
    backend = _choose(backend, x0, "ddim_jump")
    if backend == "torch":
        return reference.ddim_jump(x0, eps, alpha_next, sigma_next).contiguous()
    return _ddim_jump.ddim_jump(x0, eps, alpha_next, sigma_next, backend)


@ddim_jump.register_fake
def _(x0, eps, alpha_next, sigma_next, backend):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)

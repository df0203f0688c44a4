"""The fused ops as PyTorch custom operators (each registered in its kernels/<op>.py):
``torch.library.opcheck`` of each on odd shapes and every dtype the CPU backends run, and
``torch.compile`` of whole TDM updates through them without graph breaks, equal to eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tdm_fast.kernels as K
from tdm_fast.denoiser import Denoiser
from tdm_fast.kernels import _backend
from tdm_fast.schedule import ScheduleConfig

OPS = torch.ops.tdm_fast
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(3, 5, 7), (1, 2), (2, 3, 1, 5)]


def _backends():
    names = ["native", "torch"]
    if _backend.interpreting():
        names.append("triton")
    return names


def _schedule(batch):
    a_s = torch.rand(batch) * 0.5 + 0.45
    a_t = a_s * (torch.rand(batch) * 0.5 + 0.3)
    return a_s, (1 - a_s**2).sqrt(), a_t, (1 - a_t**2).sqrt()


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_opcheck(backend, dtype, shape):
    batch = shape[0]
    x0, dc, du, df = (torch.randn(shape, dtype=dtype) for _ in range(4))
    x = x0.clone().requires_grad_()
    _opcheck(OPS.tdm_generator_loss, (x, dc, du, df, 4.5, 1e-3, True, backend))
    _opcheck(OPS.tdm_generator_loss, (x, dc, du, df, 2.0, None, False, backend))
    _opcheck(OPS.fake_score_loss, (x, dc, torch.rand(batch) * 8, torch.randn(batch), 5.0, backend))
    _opcheck(OPS.renoise, (x0, dc, du, *_schedule(batch), backend))
    a, s, _, _ = _schedule(batch)
    _opcheck(OPS.ddim_jump, (x0, dc, a, s, backend))


def test_opcheck_non_contiguous_and_runtime_choice():
    """Strided inputs, and ``backend=""``: the operator picks at run time (what torch.compile runs)."""
    x0, dc, du, df = (torch.randn(3, 9, 11, 8)[..., ::2].permute(0, 3, 1, 2) for _ in range(4))
    assert not x0.is_contiguous()
    x = x0.clone().requires_grad_()
    for backend in ("native", ""):
        _opcheck(OPS.tdm_generator_loss, (x, dc, du, df, 4.5, 1e-3, True, backend))
        _opcheck(OPS.fake_score_loss, (x, dc, torch.rand(3) * 8, torch.randn(3), 5.0, backend))
        _opcheck(OPS.renoise, (x0, dc, du, *_schedule(3), backend))
        _opcheck(OPS.ddim_jump, (x0, dc, *_schedule(3)[:2], backend))


def test_opcheck_compile_backend():
    """The Inductor fallback inside the operator (fp32; every variant costs seconds of Inductor time)."""
    x0, dc, du, df = (torch.randn(3, 4, 33) for _ in range(4))
    x = x0.clone().requires_grad_()
    _opcheck(OPS.tdm_generator_loss, (x, dc, du, df, 4.5, 1e-3, True, "compile"))
    _opcheck(OPS.fake_score_loss, (x, dc, torch.rand(3) * 8, torch.randn(3), 5.0, "compile"))


def test_backward_is_repeatable():
    """The stored gradient is rescaled out of place: a second backward through a retained graph gives
    the same gradient, not a twice-scaled one."""
    x = torch.randn(2, 40, requires_grad=True)
    dc, du, df = (torch.randn(2, 40) for _ in range(3))
    loss = K.tdm_generator_loss(x, dc, du, df, 4.5)
    (first,) = torch.autograd.grad(3.0 * loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(3.0 * loss, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_errors_cross_the_operator(monkeypatch):
    """An invalid transition raises the same ValueError from inside the operator."""
    monkeypatch.setenv(_backend.ENV, "native")
    a_s, s_s, a_t, _ = _schedule(2)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="sigma_tau"):
        OPS.renoise(x, x, x, a_s, s_s, a_t, a_t * s_s / a_s * 0.999, "")


# ------------------------------------------------------------------------------ whole updates


class TinyNet(nn.Module):
    """A small conditional conv net, ``model(x_t, t, class)`` → ε: what a Denoiser wraps."""

    def __init__(self, channels=2, width=16, classes=4):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(classes + 1, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, cond):
        emb = self.time(t.float().unsqueeze(1) / 1000.0) + self.label(cond)
        return self.out(torch.nn.functional.silu(self.inp(x) + emb[:, :, None, None]))


def _networks():
    torch.manual_seed(0)
    schedule = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    nets = [TinyNet() for _ in range(3)]
    teacher, student, fake = (Denoiser(n, schedule, "epsilon", null_cond=4) for n in nets)
    teacher.requires_grad_(False)
    return teacher, student, fake


def _update_inputs(batch=4):
    g = torch.Generator().manual_seed(1)
    return dict(x_t=torch.randn(batch, 2, 6, 6, generator=g), cond=torch.randint(0, 4, (batch,), generator=g),
                z=torch.randn(batch, 2, 6, 6, generator=g), t=torch.tensor([899, 674, 449, 224])[:batch],
                s=torch.tensor([675, 450, 225, 0])[:batch], tau=torch.tensor([800, 600, 300, 100])[:batch])


def generator_update(teacher, student, fake, x_t, cond, z, t, s, tau):
    """The generator half of a TDM iteration (trainer.generator_update without the optimizer): the
    student at x_t with grad, the rollout's DDIM jump, noisy-sample matching, the teacher's
    conditional+unconditional and the fake score's no-grad passes at x_τ, the fused loss."""
    schedule = teacher.schedule
    x0, eps = student(x_t, t, cond)
    with torch.no_grad():
        x_next = K.ddim_jump(x0, eps, *schedule(s))
    x_tau, log_w = K.renoise(x0.detach(), eps.detach(), z, *schedule(s), *schedule(tau))
    with torch.no_grad():
        (d_cond, _), (d_uncond, _) = teacher.cond_uncond(x_tau, tau, cond)
        d_fake, _ = fake(x_tau, tau, cond)
    return K.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, 4.5), x_next, log_w


def fake_update(teacher, student, fake, x_t, cond, z, t, s, tau):
    schedule = teacher.schedule
    with torch.no_grad():
        x0, eps = student(x_t, t, cond)
    x_tau, log_w = K.renoise(x0, eps, z, *schedule(s), *schedule(tau))
    d_fake, _ = fake(x_tau, tau, cond)
    return K.fake_score_loss(d_fake, x0, schedule.snr(tau), log_w, 5.0)


@pytest.mark.parametrize("update", [generator_update, fake_update], ids=["generator", "fake"])
def test_whole_update_has_no_graph_breaks(update):
    nets = _networks()
    explained = torch._dynamo.explain(update)(*nets, **_update_inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_generator_update_equals_eager():
    """torch.compile (Inductor) of the generator update, backward included, against eager."""
    torch._dynamo.reset()
    teacher, student, fake = _networks()
    inputs = _update_inputs()
    runs = {}
    for name, fn in (("eager", generator_update), ("compiled", torch.compile(generator_update, fullgraph=True))):
        student.zero_grad(set_to_none=True)
        loss, x_next, log_w = fn(teacher, student, fake, **inputs)
        loss.backward()
        runs[name] = (loss.detach(), x_next, log_w, [p.grad.clone() for p in student.parameters()])
    eager, compiled = runs["eager"], runs["compiled"]
    assert eager[0] > 0
    for got, want in zip(compiled[:3], eager[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[3], eager[3]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())

"""Without triton (macOS, Windows: Triton ships Linux wheels only) the package imports, every other
backend runs each op and its custom operator like the reference, training runs on the CPU, and
``TDM_FAST_KERNELS=triton`` is refused in one line.

Each check runs in a subprocess where ``sys.modules["triton"] = None`` makes ``import triton`` fail as
it does where the package is not installed."""
from __future__ import annotations

import os
import subprocess
import sys

BLOCK_TRITON = 'import sys; sys.modules["triton"] = None\n'

OPS_AGAINST_THE_REFERENCE = BLOCK_TRITON + r'''
import os
import warnings

import torch

import tdm_fast.kernels as K
from tdm_fast.kernels import _backend, reference as R

gen = torch.Generator().manual_seed(0)
x0, d_cond, d_uncond, d_fake = (torch.randn(3, 4, 33, generator=gen) for _ in range(4))
snr, log_w = torch.rand(3, generator=gen) * 8, torch.randn(3, generator=gen)
a_s = torch.rand(3, generator=gen) * 0.5 + 0.45
a_t = a_s * (torch.rand(3, generator=gen) * 0.5 + 0.3)
schedule = (a_s, (1 - a_s**2).sqrt(), a_t, (1 - a_t**2).sqrt())


def outputs(ops, dtype):
    """Each op's outputs, and the losses' gradients, from float inputs of ``dtype``."""
    x, dc, du, df = (t.to(dtype) for t in (x0, d_cond, d_uncond, d_fake))
    student = x.clone().requires_grad_()
    generator_loss = ops.tdm_generator_loss(student, dc, du, df, 4.5)
    generator_loss.backward()
    fake = dc.clone().requires_grad_()
    fake_loss = ops.fake_score_loss(fake, x, snr, log_w)
    fake_loss.backward()
    x_tau, log_w_out = ops.renoise(x, dc, du, *schedule)
    x_next = ops.ddim_jump(x, dc, *schedule[:2])
    return [generator_loss, student.grad, fake_loss, fake.grad, x_tau, log_w_out, x_next]


def check(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)


want = outputs(R, torch.float64)
for backend in ("native", "compile", "torch"):
    os.environ[_backend.ENV] = backend
    check(outputs(K, torch.float32), want)
    # The custom operators as torch.compile runs them: this backend, or "" (chosen when they run).
    for name in (backend, ""):
        ops = torch.ops.tdm_fast
        loss, grad, scale = ops.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, 4.5, 1e-3, True, name)
        check([loss, grad * scale.view(3, 1, 1)], want[:2])
        check(ops.fake_score_loss(d_cond, x0, snr, log_w, 5.0, name), want[2:4])
        check(ops.renoise(x0, d_cond, d_uncond, *schedule, name), want[4:6])
        check([ops.ddim_jump(x0, d_cond, *schedule[:2], name)], want[6:])

os.environ[_backend.ENV] = "triton"
try:
    K.tdm_generator_loss(x0, d_cond, d_uncond, d_fake, 4.5)
except ValueError as err:
    assert "TDM_FAST_KERNELS=triton" in str(err) and "not installed" in str(err), err
else:
    raise AssertionError("TDM_FAST_KERNELS=triton ran without triton")
# Unforced, CUDA tensors get the reference, with a warning.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert _backend.cuda_backend() == "torch"
assert any("not installed" in str(w.message) for w in caught)
assert sys.modules["triton"] is None
'''

RUN_CLI = BLOCK_TRITON + 'import runpy; sys.argv[0] = "tdm-fast"; runpy.run_module("tdm_fast", run_name="__main__")\n'


def _run(script, *args, kernels=None):
    """``python -c script args`` with ``TDM_FAST_KERNELS`` set to ``kernels`` (None: unset)."""
    env = {name: value for name, value in os.environ.items() if name != "TDM_FAST_KERNELS"}
    if kernels is not None:
        env["TDM_FAST_KERNELS"] = kernels
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=900)


def test_every_other_backend_runs_each_op_like_the_reference():
    result = _run(OPS_AGAINST_THE_REFERENCE)
    assert result.returncode == 0, result.stderr


def test_training_runs_on_cpu_and_forcing_triton_fails_in_one_line(teacher_dir, tmp_path):
    flags = ["--iterations", "1", "--batch-size", "16", "--fake-lr", "1e-3", "--cfg-scale", "3", "--kernels", "fused",
             "--quiet"]
    trained = _run(RUN_CLI, "distill", "--teacher", teacher_dir, "--out", tmp_path / "run", *flags)
    assert trained.returncode == 0, trained.stderr
    forced = _run(RUN_CLI, "distill", "--teacher", teacher_dir, "--out", tmp_path / "forced", *flags,
                  kernels="triton")
    last = forced.stderr.strip().splitlines()[-1]
    assert forced.returncode == 2, forced.stderr
    assert last.startswith("tdm-fast: error: TDM_FAST_KERNELS=triton") and "not installed" in last, forced.stderr

"""Fused TDM kernels vs a float64 evaluation of the reference (kernels/reference.py).

Tolerances. Inputs are drawn in the tested dtype, so their float64 upcast is exact and the only
errors left are the fused op's float32 arithmetic and the rounding of its outputs:
- float32: relative error <= 1e-5 (losses; elementwise outputs relative to their largest entry);
- float16 / bfloat16 outputs: within ROUNDINGS * u of each entry plus 1e-5 of the largest entry,
  u = 2^-11 for float16 (its unit roundoff) and 2^-7 for bfloat16 (a whole ulp: the Triton
  interpreter converts float32 -> bfloat16 by truncation, GPUs round to nearest); gradients are
  rounded twice (the stored unscaled gradient, then the rescale in backward), everything else once;
- losses and log_w are float32 for every input dtype: relative 1e-5. log_w is a difference of two
  means of squares, so its error is measured against the size of those means, not of log_w itself.

The Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with the default one-program-
per-sample blocks, and through the launchers with small blocks to exercise the multi-chunk reduction.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tdm_fast.kernels as K
from tdm_fast.kernels import _backend, _native, reference as R

generator_loss = importlib.import_module("tdm_fast.kernels.generator_loss")
renoise_mod = importlib.import_module("tdm_fast.kernels.renoise")
fake_score_mod = importlib.import_module("tdm_fast.kernels.fake_score_loss")
ddim_mod = importlib.import_module("tdm_fast.kernels.ddim_jump")

UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7, torch.float64: 0.0}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUSED = ["triton", "native", "compile"]

needs_triton = pytest.mark.skipif(
    not _backend.interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv(_backend.ENV, request.param)
    return request.param


def _backend_params(names):
    return [pytest.param(n, marks=needs_triton) if n == "triton" else n for n in names]


def assert_close_to64(out, ref64, dtype, roundings=1, extra=0.0):
    """Entrywise: |out - ref| <= roundings * u(dtype) * |ref| + 1e-5 * max|ref| (+ fp16 subnormals)."""
    assert out.dtype == dtype
    assert out.shape == ref64.shape
    err = (out.double() - ref64).abs()
    scale = ref64.abs().max().clamp_min(1e-30)
    bound = roundings * UNIT_ROUNDOFF[dtype] * ref64.abs() + 1e-5 * scale + extra
    if dtype == torch.float16:
        bound = bound + 2.0**-24
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds the bound by {worst:.3e}"


def assert_rel(out, ref64, rtol=1e-5):
    err = (out.double() - ref64).abs().max().item()
    assert err <= rtol * ref64.abs().max().item() + 1e-12, f"error {err:.3e} vs {ref64.abs().max().item():.3e}"


def _schedule(batch, gen=None):
    """VP-like per-sample scalars with tau well above s: sigma_tau^2 > (alpha_tau sigma_s / alpha_s)^2."""
    a_s = torch.rand(batch, generator=gen) * 0.5 + 0.45
    s_s = (1 - a_s**2).sqrt()
    a_t = a_s * (torch.rand(batch, generator=gen) * 0.5 + 0.3)
    s_t = (1 - a_t**2).sqrt()
    return a_s, s_s, a_t, s_t


# ------------------------------------------------------------------------------- per-op checks


def check_generator_loss(x0, d_cond, d_uncond, d_fake, cfg_scale=4.5, huber_c=1e-3, normalize=True, fn=None):
    dtype = x0.dtype
    x = x0.detach().clone().requires_grad_()
    loss = (fn or K.tdm_generator_loss)(x, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize)
    loss.backward()
    x64 = x0.detach().double().requires_grad_()
    ref = R.tdm_generator_loss(x64, d_cond.double(), d_uncond.double(), d_fake.double(), cfg_scale, huber_c, normalize)
    ref.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel(loss, ref)
    assert_close_to64(x.grad, x64.grad, dtype, roundings=2, extra=_huber_conditioning(x64, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize))


def _huber_conditioning(x64, d_cond, d_uncond, d_fake, cfg_scale, huber_c, normalize):
    """Error any float32 evaluation makes in the gradient: near u = 0 the pseudo-Huber derivative
    g(u) = u / sqrt(u² + c²) has slope 1/c, which multiplies the float32 rounding of
    u = d_fake - D_cfg (a few ulps of the operands' size)."""
    if huber_c is None:
        return 0.0
    dc, du, df = (t.double() for t in (d_cond, d_uncond, d_fake))
    d_cfg = du + cfg_scale * (dc - du)
    u = df - d_cfg
    size = df.abs() + du.abs() + abs(cfg_scale) * (dc.abs() + du.abs())
    slope = huber_c**2 / (u * u + huber_c**2) ** 1.5
    batch = x64.shape[0]
    norm = R._mean_per_sample((x64.detach() - d_cfg).abs()).clamp_min(1e-6) if normalize else torch.ones(batch, dtype=torch.float64, device=x64.device)
    per_sample = 1.0 / (norm * x64.numel())
    return 4 * 2.0**-24 * size * slope * per_sample.reshape(-1, *([1] * (x64.dim() - 1)))


def check_renoise(x0, eps, z, scalars):
    x_tau, log_w = K.renoise(x0, eps, z, *scalars)
    ref_x, ref_w = R.renoise(x0.double(), eps.double(), z.double(), *scalars)
    assert_close_to64(x_tau, ref_x, x0.dtype)
    assert log_w.shape == (x0.shape[0],) and log_w.dtype == torch.float32
    terms = R._mean_per_sample(z.double() ** 2)
    err = (log_w.double() - ref_w).abs()
    assert (err <= 1e-5 * (terms + ref_w.abs() + 1)).all(), err.max()


def check_fake_score_loss(d_fake, target, snr, log_w, snr_cap=5.0):
    d = d_fake.detach().clone().requires_grad_()
    loss = K.fake_score_loss(d, target, snr, log_w, snr_cap)
    loss.backward()
    d64 = d_fake.detach().double().requires_grad_()
    ref = R.fake_score_loss(d64, target.double(), snr, log_w, snr_cap)
    ref.backward()
    assert_rel(loss, ref)
    assert_close_to64(d.grad, d64.grad, d_fake.dtype, roundings=2)


def check_ddim_jump(x0, eps, alpha, sigma):
    with torch.no_grad():
        out = K.ddim_jump(x0, eps, alpha, sigma)
    assert_close_to64(out, R.ddim_jump(x0.double(), eps.double(), alpha, sigma), x0.dtype)


def _inputs(shape, dtype, n):
    return [torch.randn(shape).to(dtype) for _ in range(n)]


# ------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", _backend_params(FUSED), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("huber_c", [1e-3, None])
def test_generator_loss_parity(backend, dtype, huber_c):
    if backend == "compile" and (dtype == torch.float16 or (huber_c is None and dtype != torch.float32)):
        pytest.skip("each compile variant costs seconds of Inductor time; fp32/bf16 Huber and fp32 MSE suffice")
    check_generator_loss(*_inputs((3, 5, 7, 9), dtype, 4), huber_c=huber_c)


@pytest.mark.parametrize("backend", _backend_params(["triton", "native"]), indirect=True)
def test_generator_loss_options(backend):
    x0, dc, du, df = _inputs((2, 4, 33), torch.float32, 4)
    check_generator_loss(x0, dc, du, df, cfg_scale=1.0, huber_c=0.5, normalize=False)
    # d_fake == D_cfg: zero gradient, n_b clamped away from zero when x0 sits on D_cfg too.
    check_generator_loss(x0, x0, x0, x0, cfg_scale=2.0)


@pytest.mark.parametrize("backend", _backend_params(FUSED), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_renoise_parity(backend, dtype):
    if backend == "compile" and dtype == torch.float16:
        pytest.skip("compile variants are slow to build; fp32 and bf16 cover the formulation")
    check_renoise(*_inputs((3, 4, 9, 11), dtype, 3), _schedule(3))


@pytest.mark.parametrize("backend", _backend_params(FUSED), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_score_loss_parity(backend, dtype):
    if backend == "compile" and dtype == torch.float16:
        pytest.skip("compile variants are slow to build; fp32 and bf16 cover the formulation")
    d, t = _inputs((3, 4, 9, 11), dtype, 2)
    check_fake_score_loss(d, t, torch.tensor([0.5, 3.0, 40.0]), torch.tensor([0.3, -1.2, 2.0]))


@pytest.mark.parametrize("backend", _backend_params(FUSED), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_jump_parity(backend, dtype):
    if backend == "compile" and dtype == torch.float16:
        pytest.skip("compile variants are slow to build; fp32 and bf16 cover the formulation")
    a_s, s_s, _, _ = _schedule(3)
    check_ddim_jump(*_inputs((3, 4, 9, 11), dtype, 2), a_s, s_s)


@pytest.mark.parametrize("backend", _backend_params(["triton", "native"]), indirect=True)
@pytest.mark.parametrize("shape", [(1, 2), (1, 4, 8, 8), (3, 1000), (5, 3, 2)])
def test_odd_sizes(backend, shape):
    batch = shape[0]
    check_generator_loss(*_inputs(shape, torch.float32, 4))
    check_renoise(*_inputs(shape, torch.float32, 3), _schedule(batch))
    check_fake_score_loss(*_inputs(shape, torch.float32, 2), torch.rand(batch) * 8, torch.randn(batch))
    a, s, _, _ = _schedule(batch)
    check_ddim_jump(*_inputs(shape, torch.float32, 2), a, s)


@pytest.mark.parametrize("backend", _backend_params(FUSED), indirect=True)
def test_non_contiguous(backend):
    def strided():
        # Channels-last-like permutation plus a step: neither contiguous nor a plain reshape away.
        return torch.randn(3, 9, 11, 8)[..., ::2].permute(0, 3, 1, 2)

    x0, dc, du, df = (strided() for _ in range(4))
    assert not x0.is_contiguous()
    check_generator_loss(x0, dc, du, df)
    check_renoise(x0, dc, du, _schedule(3))
    check_fake_score_loss(x0, dc, torch.rand(3) * 8, torch.randn(3))
    a, s, _, _ = _schedule(3)
    check_ddim_jump(x0, dc, a, s)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_chunk_reduction(dtype):
    """Blocks smaller than a sample: the per-sample sums come from several programs."""
    batch, d, block = 3, 1000, 64  # 1000 is not a multiple of 64: the last chunk is masked
    x0, dc, du, df = _inputs((batch, d), dtype, 4)
    # finish_rows=2: the per-sample finish walks the 3 samples in two tiles of rows.
    grad, loss, scale = generator_loss._launch_triton(x0, dc, du, df, 4.5, 1e-3, True, block=block, finish_rows=2)
    x64 = x0.double().requires_grad_()
    ref = R.tdm_generator_loss(x64, dc.double(), du.double(), df.double(), 4.5)
    ref.backward()
    assert_rel(loss, ref)
    assert_close_to64((grad * scale.unsqueeze(1)).to(dtype), x64.grad, dtype, roundings=2)

    a_s, s_s, a_t, s_t = _schedule(batch)
    out, log_w = renoise_mod._launch_triton(x0, dc, du, (a_s, s_s, a_t, s_t), block=block)
    ref_x, ref_w = R.renoise(x0.double(), dc.double(), du.double(), a_s, s_s, a_t, s_t)
    assert_close_to64(out, ref_x, dtype)
    assert torch.allclose(log_w.double(), ref_w, atol=1e-5, rtol=0)

    snr, lw = torch.rand(batch) * 8, torch.randn(batch)
    grad, loss = fake_score_mod._launch_triton(x0, dc, snr, lw, 5.0, block=block)
    d64 = x0.double().requires_grad_()
    ref = R.fake_score_loss(d64, dc.double(), snr, lw)
    ref.backward()
    assert_rel(loss, ref)
    assert_close_to64(grad, d64.grad, dtype)

    out = ddim_mod._launch_triton(x0, dc, a_s, s_s, block=block)
    assert_close_to64(out, R.ddim_jump(x0.double(), dc.double(), a_s, s_s), dtype)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 4),
    d=st.integers(2, 3000),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    cfg=st.floats(0.0, 8.0),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_and_values(monkeypatch, batch, d, scale, cfg, seed):
    for backend in ("triton", "native") if _backend.interpreting() else ("native",):
        monkeypatch.setenv(_backend.ENV, backend)
        gen = torch.Generator().manual_seed(seed)
        x0, dc, du, df = (torch.randn(batch, d, generator=gen) * scale for _ in range(4))
        check_generator_loss(x0, dc, du, df, cfg_scale=cfg)
        check_renoise(x0, dc, du, _schedule(batch, gen))
        check_fake_score_loss(x0, dc, torch.rand(batch, generator=gen) * 8, torch.randn(batch, generator=gen))


@pytest.mark.parametrize("backend", _backend_params(["triton", "native"]), indirect=True)
def test_gradient_flows_only_to_the_differentiable_input(backend):
    x0, dc, du, df = (t.requires_grad_() for t in _inputs((2, 40), torch.float32, 4))
    K.tdm_generator_loss(x0, dc, du, df, 3.0).backward()
    assert x0.grad is not None and dc.grad is None and du.grad is None and df.grad is None
    d, t = (v.requires_grad_() for v in _inputs((2, 40), torch.float32, 2))
    K.fake_score_loss(d, t, torch.ones(2), torch.zeros(2)).backward()
    assert d.grad is not None and t.grad is None


@pytest.mark.parametrize("backend", _backend_params(FUSED), indirect=True)
@pytest.mark.parametrize("grad_output", [3.0, 1.0])
def test_grad_output_scaling(backend, grad_output):
    """Backward rescales by grad_output (the CPU path skips the pass when it is exactly 1)."""
    x0, dc, du, df = _inputs((2, 40), torch.float32, 4)
    x = x0.clone().requires_grad_()
    (grad_output * K.tdm_generator_loss(x, dc, du, df, 4.5)).backward()
    x64 = x0.double().requires_grad_()
    (grad_output * R.tdm_generator_loss(x64, dc.double(), du.double(), df.double(), 4.5)).backward()
    assert_rel(x.grad, x64.grad)
    snr, log_w = torch.rand(2) * 8, torch.randn(2)
    d = dc.clone().requires_grad_()
    (grad_output * K.fake_score_loss(d, df, snr, log_w)).backward()
    d64 = dc.double().requires_grad_()
    (grad_output * R.fake_score_loss(d64, df.double(), snr.double(), log_w.double())).backward()
    assert_rel(d.grad, d64.grad)


def test_renoise_with_gradients_uses_the_reference(monkeypatch):
    """The fused renoise/ddim_jump have no backward; a call that needs one gets the reference."""
    monkeypatch.setenv(_backend.ENV, "compile")
    monkeypatch.setitem(renoise_mod._LAUNCHERS, "compile", _fail)
    monkeypatch.setitem(ddim_mod._LAUNCHERS, "compile", _fail)
    x0 = torch.randn(2, 8, requires_grad=True)
    eps, z = torch.randn(2, 8), torch.randn(2, 8)
    a_s, s_s, a_t, s_t = _schedule(2)
    x_tau, log_w = K.renoise(x0, eps, z, a_s, s_s, a_t, s_t)
    (x_tau.sum() + log_w.sum()).backward()
    assert x0.grad is not None
    K.ddim_jump(x0, eps, a_s, s_s).sum().backward()


def _fail(*args, **kwargs):
    raise AssertionError("the fused path must not run here")


# ------------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize("name", ["triton", "native", "compile", "torch"])
def test_env_selects_backend(monkeypatch, name):
    if name == "triton" and not _backend.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv(_backend.ENV, name)
    x0 = torch.randn(3, 5, 7, 9)
    assert K.select_backend(x0) == name
    calls = []

    def spy(module, attr):
        original = getattr(module, attr)

        def wrapped(*args, **kwargs):
            calls.append(f"{module.__name__.rsplit('.', 1)[-1]}.{attr}")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapped)

    if name == "torch":
        spy(R, "tdm_generator_loss")
        expected = "reference.tdm_generator_loss"
    else:
        spy(generator_loss, f"_launch_{name}")
        monkeypatch.setitem(generator_loss._LAUNCHERS, name, getattr(generator_loss, f"_launch_{name}"))
        expected = f"generator_loss._launch_{name}"
    check_generator_loss(x0, *_inputs(x0.shape, torch.float32, 3))
    assert calls[0] == expected  # (the float64 check calls the reference after it)


def test_top_level_kernels_name_stays_inert():
    """From a clone's root the folder also imports as ``kernels``, the name of Hugging Face's kernel hub
    package (which transformers imports): that import hands over to the hub package, or fails as if the
    folder were not there, and never loads our ops a second time (tests/test_fresh_machine.py runs the
    hub package itself)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(K.__file__).resolve().parents[1]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import torch, tdm_fast.kernels as K\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError:\n"
        "    kernels = None\n"
        "assert kernels is not K and not hasattr(kernels, 'tdm_generator_loss'), dir(kernels)\n"
        "ours = sys.argv[1] + '/kernels/'\n"
        "loaded = [m for m, mod in list(sys.modules.items()) if str(getattr(mod, '__file__', '')).startswith(ours)]\n"
        # Under the top-level name only the hand-over itself runs.
        "assert all(m.startswith('tdm_fast.') or m == 'kernels._shadow' for m in loaded), loaded\n"
    )
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, timeout=300)


def test_default_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV, raising=False)
    assert K.select_backend(torch.zeros(2, 3)) == "native"
    assert K.select_backend(torch.zeros(2, 3), "tdm_generator_loss") == "native"
    # A tiny DDIM jump costs less in the eager reference (two ops) than a native call's fixed cost.
    assert K.select_backend(torch.zeros(2, 3), "ddim_jump") == "torch"
    assert K.select_backend(torch.zeros(8, 4, 64, 64), "ddim_jump") == "native"
    assert K.select_backend(torch.zeros(2, 3, device="meta")) == "torch"
    # Without a compiler for the native loops: Inductor, except where a call is too small to pay
    # for a compiled call's fixed overhead.
    monkeypatch.setattr(_backend, "cpu_backend", lambda: "compile")
    assert K.select_backend(torch.zeros(2, 3), "tdm_generator_loss") == "compile"
    assert K.select_backend(torch.zeros(2, 3), "ddim_jump") == "torch"
    assert K.select_backend(torch.zeros(8, 4, 64, 64), "ddim_jump") == "compile"
    # Nor a working Inductor (it needs a C++ compiler too): the reference.
    monkeypatch.setattr(_backend, "cpu_backend", lambda: "torch")
    assert K.select_backend(torch.zeros(8, 4, 64, 64), "tdm_generator_loss") == "torch"


def test_native_refuses_other_devices(monkeypatch):
    monkeypatch.setenv(_backend.ENV, "native")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        K.select_backend(torch.zeros(2, 3, device="meta"))


def test_native_without_a_compiler_explains(monkeypatch, tmp_path):
    """A failed build names the fix; the default choice then falls back to Inductor with a warning.
    (Inductor read $CXX when it was imported, so its probe is stubbed; tests/test_native_cache.py
    runs a broken $CXX in a fresh process.)"""
    monkeypatch.setenv(_native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setattr(_backend, "inductor_works", lambda: True)
    caches = (_native.library, _native.kernel, _native.build_error, _backend._cpu_fallback)
    for cached in caches:
        cached.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="TDM_FAST_KERNELS=compile"):
            _native.library(generator_loss._NATIVE)
        assert not _native.available()
        monkeypatch.delenv(_backend.ENV, raising=False)
        with pytest.warns(UserWarning, match="torch.compile instead.*no-such-c"):
            assert K.select_backend(torch.zeros(2, 3), "tdm_generator_loss") == "compile"
    finally:
        for cached in caches:
            cached.cache_clear()


@pytest.mark.parametrize("shape", [(3, 40_000), (1, 13, 16, 60, 90), (5_000, 7)])
def test_native_multi_tile(monkeypatch, shape):
    """Samples longer than one tile (16,384 elements, not a multiple of it): per-sample sums over
    several tiles, and the video latent's 1.1 M-element sample; samples much shorter than a tile:
    tiles of whole samples (2,340 of 7 elements, the last one partial)."""
    monkeypatch.setenv(_backend.ENV, "native")
    batch = shape[0]
    x0, dc, du, df = _inputs(shape, torch.float32, 4)
    check_generator_loss(x0, dc, du, df)
    check_renoise(x0, dc, du, _schedule(batch))
    check_fake_score_loss(x0, dc, torch.rand(batch) * 8, torch.randn(batch))
    a, s, _, _ = _schedule(batch)
    check_ddim_jump(x0, dc, a, s)


def test_native_is_deterministic_across_thread_counts(monkeypatch):
    """Per-tile partial sums added in a fixed order: the same bits with 1 thread or 2."""
    monkeypatch.setenv(_backend.ENV, "native")
    x0, dc, du, df = _inputs((5, 40_000), torch.float32, 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = x0.clone().requires_grad_()
            loss = K.tdm_generator_loss(x, dc, du, df, 4.5)
            loss.backward()
            results.append((loss, x.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv(_backend.ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="TDM_FAST_KERNELS"):
        K.tdm_generator_loss(*_inputs((2, 3), torch.float32, 4), 1.0)


def test_triton_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv(_backend.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.select_backend(torch.zeros(2, 3))


def test_reference_importable():
    from tdm_fast.kernels import reference

    assert reference.tdm_generator_loss is R.tdm_generator_loss
    assert set(K.__all__) >= {"tdm_generator_loss", "renoise", "fake_score_loss", "importance_weights", "ddim_jump"}


# ------------------------------------------------------------------------------- bad input


def _good():
    x = torch.randn(2, 3, 4)
    return x, torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)


_S = _schedule(2)
_BAD = [
    # (call, exception, argument named in the message)
    (lambda x, a, b, c: K.tdm_generator_loss(x, a[:1], b, c, 1.0), ValueError, "d_cond"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b, c.reshape(2, 12), 1.0), ValueError, "d_fake"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b.to("meta"), c, 1.0), ValueError, "d_uncond"),
    (lambda x, a, b, c: K.tdm_generator_loss(x.long(), a, b, c, 1.0), TypeError, "x0"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a.int(), b, c, 1.0), TypeError, "d_cond"),
    (lambda x, a, b, c: K.tdm_generator_loss(x.numpy(), a, b, c, 1.0), TypeError, "x0"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b, c, float("nan")), ValueError, "cfg_scale"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b, c, torch.tensor(float("nan"))), ValueError, "cfg_scale"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b, c, "4.5"), TypeError, "cfg_scale"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b, c, 1.0, huber_c=0.0), ValueError, "huber_c"),
    (lambda x, a, b, c: K.tdm_generator_loss(x, a, b, c, 1.0, normalize=None), TypeError, "normalize"),
    (lambda x, a, b, c: K.tdm_generator_loss(x[:0], a[:0], b[:0], c[:0], 1.0), ValueError, "x0"),
    (lambda x, a, b, c: K.renoise(x, a, b[:1], *_S), ValueError, "z"),
    (lambda x, a, b, c: K.renoise(x, a.half().long(), b, *_S), TypeError, "eps"),
    (lambda x, a, b, c: K.renoise(x, a, b, torch.ones(3), *_S[1:]), ValueError, "alpha_s"),
    (lambda x, a, b, c: K.renoise(x, a, b, *_S[:3], torch.ones(2, 1)), ValueError, "sigma_tau"),
    (lambda x, a, b, c: K.renoise(x, a, b, *_S[:2], _S[2].long(), _S[3]), TypeError, "alpha_tau"),
    (lambda x, a, b, c: K.renoise(x, a, b, *_S[:2], _S[2].to("meta"), _S[3]), ValueError, "alpha_tau"),
    (lambda x, a, b, c: K.renoise(x, a, b, *_S[:3], _S[2] * _S[1] / _S[0] * 0.999), ValueError, "sigma_tau"),
    (lambda x, a, b, c: K.renoise(x, a, b, torch.zeros(2), *_S[1:]), ValueError, "alpha_s"),
    (lambda x, a, b, c: K.renoise(x, a, b, *_S[:2], "0.5", _S[3]), TypeError, "alpha_tau"),
    (lambda x, a, b, c: K.fake_score_loss(x, a.transpose(1, 2), torch.ones(2), torch.zeros(2)), ValueError, "x0_target"),
    (lambda x, a, b, c: K.fake_score_loss(x, a, torch.ones(3), torch.zeros(2)), ValueError, "snr_tau"),
    (lambda x, a, b, c: K.fake_score_loss(x, a, torch.ones(2), torch.zeros(5)), ValueError, "log_w"),
    (lambda x, a, b, c: K.fake_score_loss(x, a, torch.ones(2), torch.zeros(2), snr_cap=float("nan")), ValueError, "snr_cap"),
    (lambda x, a, b, c: K.fake_score_loss(x.int(), a, torch.ones(2), torch.zeros(2)), TypeError, "d_fake"),
    (lambda x, a, b, c: K.ddim_jump(x, a[:, :1], torch.ones(2), torch.ones(2)), ValueError, "eps"),
    (lambda x, a, b, c: K.ddim_jump(x, a, torch.ones(4), torch.ones(2)), ValueError, "alpha_next"),
    (lambda x, a, b, c: K.ddim_jump(x, a, torch.ones(2), torch.ones(2, dtype=torch.int64)), TypeError, "sigma_next"),
]


@pytest.mark.parametrize("backend", ["torch", "native", "compile"], indirect=True)
@pytest.mark.parametrize("call,exc,name", _BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(_BAD)])
def test_bad_input(backend, call, exc, name):
    with pytest.raises(exc, match=name):
        call(*_good())


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
class TestTritonOnCuda:
    """Triton on a real GPU against the float64 reference (run by bench/gpu_kernels.sh)."""

    @pytest.fixture(autouse=True)
    def _triton(self, monkeypatch):
        monkeypatch.setenv(_backend.ENV, "triton")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(1, 2), (3, 1000), (8, 4, 64, 64), (8, 4, 128, 128), (1, 13, 16, 60, 90)])
    def test_parity(self, dtype, shape):
        dev = torch.device("cuda")
        batch = shape[0]
        ins = [t.cuda() for t in _inputs(shape, dtype, 4)]
        check_generator_loss(*ins)
        check_generator_loss(*ins, huber_c=None, normalize=False)
        check_renoise(*ins[:3], [s.to(dev) for s in _schedule(batch)])
        check_fake_score_loss(*ins[:2], torch.rand(batch, device=dev) * 8, torch.randn(batch, device=dev))
        a, s, _, _ = (v.to(dev) for v in _schedule(batch))
        check_ddim_jump(*ins[:2], a, s)

    def test_non_contiguous(self):
        x0, dc, du, df = (torch.randn(4, 9, 11, 8, device="cuda")[..., ::2].permute(0, 3, 1, 2) for _ in range(4))
        check_generator_loss(x0, dc, du, df)

    def test_int64_offsets(self):
        """B * D > 2^31: the last sample must land where it belongs."""
        free, _ = torch.cuda.mem_get_info()
        batch, d = 2, 2**30 + 5
        if free < 6 * batch * d * 2:
            pytest.skip("not enough GPU memory for 2^31 bf16 elements x 5 tensors")
        x0 = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
        eps = torch.randn_like(x0)
        a = torch.tensor([0.5, 0.25], device="cuda")
        s = torch.tensor([0.75, 2.0], device="cuda")
        with torch.no_grad():
            out = K.ddim_jump(x0, eps, a, s)
        tail = slice(d - 4096, d)
        expect = (a[1] * x0[1, tail].float() + s[1] * eps[1, tail].float()).to(torch.bfloat16)
        assert torch.equal(out[1, tail], expect)
        z = torch.randn_like(x0)
        a_s, s_s, a_t, s_t = (v.cuda() for v in _schedule(batch))
        with torch.no_grad():
            x_tau, log_w = K.renoise(x0, eps, z, a_s, s_s, a_t, s_t)
        ref_x, _ = R.renoise(x0[1:, tail], eps[1:, tail], z[1:, tail], a_s[1:], s_s[1:], a_t[1:], s_t[1:])
        assert (x_tau[1:, tail].float() - ref_x.float()).abs().max() <= 2**-7 * ref_x.float().abs().max()
        assert torch.isfinite(log_w).all()

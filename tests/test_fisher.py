"""The Fisher-divergence objective (``objective="fisher"``, docs/fisher.md): the loss against its
definition, the derivation's claim on a Gaussian case, and the trainer's use of it."""
from __future__ import annotations

import dataclasses
import pytest
import torch

from tdm_fast import objectives
from tdm_fast.config import TDMConfig
from tdm_fast.kernels import reference
from tdm_fast.demos.toy2d import NUM_CLASSES, ToyMLP, toy_denoiser
from tdm_fast.trainer import ClassConditions, TDMTrainer

SHAPES = [(3, 5), (2, 1, 3, 7), (5, 2, 3, 3)]


def _tanh_net(shape, seed):
    """A smooth per-sample map ``tanh(x W)`` on the flattened sample, and its vector-Jacobian product
    in closed form (no autograd), so the gradient formula of docs/fisher.md can be checked."""
    d = int(torch.tensor(shape[1:]).prod())
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / d**0.5

    def net(x):
        return torch.tanh(x.reshape(x.shape[0], -1) @ w).reshape(x.shape)

    def vjp(x, v):
        sech2 = 1 - torch.tanh(x.reshape(x.shape[0], -1) @ w) ** 2
        return ((sech2 * v.reshape(v.shape[0], -1)) @ w.T).reshape(x.shape)

    return net, vjp


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    alpha = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.8 + 0.1
    return x0, eps, alpha, (1 - alpha**2).sqrt()


def _per(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5, -0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_matches_autograd_of_the_definition_and_the_closed_form(shape, cfg_scale, normalize):
    x0, eps, alpha, sigma = _inputs(shape)
    (cond, cond_vjp), (uncond, uncond_vjp), (fake, fake_vjp) = (_tanh_net(shape, s) for s in (1, 2, 3))

    # the implementation, with x_τ built as the trainer builds it
    x = x0.clone().requires_grad_(True)
    x_tau = objectives.with_x0_path(_per(alpha, x) * x0 + _per(sigma, x) * eps, x, alpha)
    loss = objectives.fisher_generator_loss(x, cond(x_tau), uncond(x_tau), fake(x_tau), cfg_scale, normalize)
    (grad,) = torch.autograd.grad(loss, x)

    # the definition, written out: x_τ = α x̂0 + σ ε, the difference of the two denoising errors
    y = x0.clone().requires_grad_(True)
    y_tau = _per(alpha, y) * y + _per(sigma, y) * eps
    d_cfg = uncond(y_tau) + cfg_scale * (cond(y_tau) - uncond(y_tau))
    norm = (y - d_cfg).abs().flatten(1).mean(1).detach() if normalize else torch.ones(shape[0], dtype=torch.float64)
    want_loss = ((((d_cfg - y) ** 2 - (fake(y_tau) - y) ** 2).flatten(1).mean(1)) / norm).mean()
    (want,) = torch.autograd.grad(want_loss, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-14)

    # the closed form: [2 (D_f − D_cfg) + 2 α (J_cfg^T (D_cfg − x̂0) − J_f^T (D_f − x̂0))] / (n_b B D)
    with torch.no_grad():
        t = _per(alpha, x0) * x0 + _per(sigma, x0) * eps
        dc, du, df = cond(t), uncond(t), fake(t)
        dcfg = du + cfg_scale * (dc - du)
        r = dcfg - x0
        jt_cfg = (1 - cfg_scale) * uncond_vjp(t, r) + cfg_scale * cond_vjp(t, r)
        closed = 2 * (df - dcfg) + 2 * _per(alpha, x0) * (jt_cfg - fake_vjp(t, df - x0))
        closed = closed / _per(norm, x0) / x0[0].numel() / shape[0]
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_finite_differences_without_the_detached_normaliser(shape):
    x0, eps, alpha, sigma = _inputs(shape, seed=1)
    nets = [_tanh_net(shape, s)[0] for s in (4, 5, 6)]

    def loss(x):
        x_tau = objectives.with_x0_path(_per(alpha, x) * x.detach() + _per(sigma, x) * eps, x, alpha)
        return objectives.fisher_generator_loss(x, *(n(x_tau) for n in nets), 1.7, normalize=False)

    assert torch.autograd.gradcheck(loss, (x0.requires_grad_(True),))


def test_with_fixed_networks_the_gradient_is_the_kl_loss_with_mse():
    """Without the Jacobian terms the Fisher gradient is the KL loss's (MSE form): 2 (D_f − D_cfg) / (n_b B D)."""
    g = torch.Generator().manual_seed(2)
    x0, dc, du, df = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(4))
    grads = []
    for fn in (objectives.fisher_generator_loss, lambda *a: reference.tdm_generator_loss(*a, huber_c=None)):
        x = x0.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(x, dc, du, df, 3.0), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_the_surrogate_gives_the_gradient_of_the_fisher_divergence_on_gaussians():
    """The derivation's claim, in closed form: teacher data N(m, s_p² I), student x̂0 = θ + s_q z, the fake
    score the student's exact denoiser with θ frozen. E[loss] is the Fisher divergence (x0 units) and
    E[∇_θ loss] its gradient, −2 (1 − c_p α)² (m − θ) / D; the networks' Jacobian terms are needed for it."""
    n, alpha, sigma, s_p, s_q = 400_000, 0.6, 0.8, 0.7, 1.3
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    theta0 = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    c_p = alpha * s_p**2 / (alpha**2 * s_p**2 + sigma**2)
    v_q = alpha**2 * s_q**2 + sigma**2
    c_q = alpha * s_q**2 / v_q

    def teacher(x):
        return m + c_p * (x - alpha * m)

    def fake(x):  # the student's denoiser E[x̂0 | x_τ], frozen at θ0
        return theta0 + c_q * (x - alpha * theta0)

    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)

    def gradient(detach_networks):
        theta = theta0.clone().requires_grad_(True)
        x0 = theta + s_q * z
        x_tau = objectives.with_x0_path(alpha * x0.detach() + sigma * eps, x0, torch.full((n,), alpha, dtype=torch.float64))
        if detach_networks:
            x_tau = x_tau.detach()
        loss = objectives.fisher_generator_loss(x0, teacher(x_tau), teacher(x_tau), fake(x_tau), 1.0, normalize=False)
        return loss.detach(), torch.autograd.grad(loss, theta)[0]

    loss, grad = gradient(False)
    divergence = ((1 - c_p * alpha) ** 2 * (m - theta0) ** 2 + (c_p - c_q) ** 2 * v_q).mean()
    want = -2 * (1 - c_p * alpha) ** 2 * (m - theta0) / 3
    assert float(loss) == pytest.approx(float(divergence), rel=2e-2)
    torch.testing.assert_close(grad, want, rtol=0, atol=5e-3)
    _, direct_only = gradient(True)
    assert (direct_only - want).abs().max() > 0.05  # the Jacobian terms matter


# -- the trainer -------------------------------------------------------------------------------
@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return toy_denoiser(ToyMLP(hidden=32, depth=1))


def _trainer(teacher, out=None, **overrides):
    settings = dict(steps=(1, 2, 4), batch_size=16, iterations=4, fake_lr=1e-3, cfg_scale=3.0, kernels="reference")
    settings.update(overrides)
    return TDMTrainer(teacher, TDMConfig(**settings), ClassConditions(NUM_CLASSES), (2,), output_dir=out, progress=False)


def _watch_generator_update(trainer):
    """Wraps the instance's generator_update: records the fake's grads, requires_grad and weights around it."""
    seen = []
    inner = trainer.generator_update

    def wrapped(batches, k):
        before = [p.detach().clone() for p in trainer.fake_core.parameters()]
        out = inner(batches, k)
        fake = list(trainer.fake_core.parameters())
        seen.append(dict(grads=[p.grad for p in fake], requires_grad=[p.requires_grad for p in fake],
                         unchanged=all(torch.equal(a, b) for a, b in zip(before, fake))))
        return out

    trainer.generator_update = wrapped
    return seen


def test_default_objective_is_kl_and_never_differentiates_teacher_or_fake(teacher):
    assert TDMConfig().objective == "kl"
    trainer = _trainer(teacher)
    inside, graded = [], []

    def record(module, args, out):
        if inside:
            graded.append(out[0].requires_grad)

    for net in (trainer.teacher, trainer.fake_core):
        net.register_forward_hook(record)
    inner = trainer.generator_update

    def generator_update(batches, k):
        inside.append(True)
        try:
            return inner(batches, k)
        finally:
            inside.clear()

    trainer.generator_update = generator_update
    trainer.train()
    assert len(graded) == 2 * 4 and not any(graded)


@pytest.mark.parametrize("overrides", [{}, dict(gradient_accumulation_steps=2, matching="clean", normalize=False),
                                       dict(student_solver="dpmsolver", steps=(4,))])
def test_fisher_trains_the_student_only(teacher, overrides):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _trainer(teacher, objective="fisher", **overrides)
    seen = _watch_generator_update(trainer)
    student_before = {k: v.clone() for k, v in trainer.student_core.state_dict().items()}
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([r["fake_loss"], r["generator_loss"]])).all() for r in history)
    for s in seen:  # the generator loss left no gradient on the fake score, which trains on as before
        assert all(g is None for g in s["grads"]) and all(s["requires_grad"]) and s["unchanged"]
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in trainer.student_core.state_dict().items())


def test_fisher_with_lora_roles_and_gradient_checkpointing(tmp_path):
    """LoRA roles share one base: the teacher is the base with adapters off, the fake a second adapter.
    The Fisher backward runs through both (checkpointed blocks are recomputed inside it) and reaches the
    student's adapter only."""
    import _backbone_tiny as tiny
    from tdm_fast.backbones.run import build_preset_run

    tiny.BUILDERS["sd15"](tmp_path / "model")
    args = tiny.preset_args("sd15", tmp_path / "model", tiny.write_prompts(tmp_path / "prompts.txt"),
                            embedding_cache=str(tmp_path / "cache"))
    args = dataclasses.replace(args, gradient_checkpointing=True)
    config = TDMConfig(steps=(4,), batch_size=2, iterations=2, cfg_scale=2.0, fake_lr=1e-2, kernels="reference",
                       objective="fisher")
    teacher, student, fake, conditions, shape = build_preset_run(args, config)
    base = teacher.model.shared.adapter
    base_before = {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = TDMTrainer(teacher, config, conditions, shape, None, student, fake, progress=False)
    seen = _watch_generator_update(trainer)
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["generator_loss"])) for h in history)
    assert len(seen) == 2 and all(all(g is None for g in s["grads"]) and all(s["requires_grad"]) and s["unchanged"]
                                  for s in seen)
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_before.items())


def test_fisher_improves_a_one_step_digits_student():
    """30 Fisher iterations on the shipped digits teacher bring the 1-step student (initially the teacher
    at t=899) much closer to the teacher's 50-step CFG samples (FID on 500 of the cached references)."""
    from safetensors.torch import load_file

    from tdm_fast.demos.demo_digits import distill_digits, early_stop_config
    from tdm_fast.demos.digits import ASSETS, load_digits_teacher
    from tdm_fast.eval.digits import DigitsMetrics, eval_inputs
    from tdm_fast.sampling import sample_student

    torch.set_num_threads(1)
    teacher = load_digits_teacher()
    n = 500
    reference_images = load_file(str(ASSETS / "digits_teacher50_ref.safetensors"))["seed0"][:n]
    noise, labels = (v[:n] for v in eval_inputs(2000, 0))
    metrics = DigitsMetrics()
    features = metrics.features(reference_images)

    def fid(denoiser):
        return metrics(sample_student(denoiser, noise, labels, 1), labels, features)["fid_teacher"]

    config = early_stop_config(30, steps=(1,), steps_conditioning=False, batch_size=32, warmup_steps=0, ema_decay=None,
                         objective="fisher")
    trainer, history, _ = distill_digits(teacher, config, progress=False)
    assert all(torch.isfinite(torch.tensor([h["fake_loss"], h["generator_loss"]])).all() for h in history)
    start, end = fid(teacher), fid(trainer.student_core)
    assert end < 0.6 * start, (start, end)


def test_profiler_shows_the_fisher_backward():
    from tdm_fast.perf.step_profiler import FISHER_BACKWARD, StepProfiler, make_trainer

    trainer = make_trainer("toy", "reference", batch=32, objective="fisher")
    with StepProfiler(trainer) as profiler:
        for _ in range(2):
            profiler.step()
        s = profiler.summary()
    ms = s["breakdown_ms"]
    assert ms[FISHER_BACKWARD] > 0 and ms["fake fwd (generator, grad: fisher)"] > 0
    assert ms["fake fwd (generator, no grad)"] == 0 and profiler._open_backwards == 0
    assert s["step_ms"] == pytest.approx(s["wall_step_ms"], rel=0.05)


# -- the setting -------------------------------------------------------------------------------
def test_objective_setting_round_trips_and_is_checked(tmp_path):
    config = TDMConfig(objective="fisher")
    assert TDMConfig.from_dict(config.to_dict()) == config
    (tmp_path / "c.yaml").write_text("objective: fisher\nsteps: [1, 4]\n")
    assert TDMConfig.from_file(tmp_path / "c.yaml").objective == "fisher"
    with pytest.raises(ValueError, match="objective must be one of"):
        TDMConfig(objective="wasserstein")
    with pytest.raises(ValueError, match="config key objective must be a str"):
        TDMConfig.from_dict({"objective": 1})


def test_resume_with_another_objective_needs_an_override(teacher):
    """The objective changes the run, not the networks: like any such setting it needs --override."""
    trainer = _trainer(teacher, objective="fisher")
    saved = _trainer(teacher).config.to_dict()
    with pytest.raises(ValueError, match=r"objective kl -> fisher.*--override objective"):
        trainer.check_resume_config(saved)
    trainer.check_resume_config(saved, overrides=("objective",))
    del saved["objective"]  # a checkpoint from before the setting existed: nothing to compare
    trainer.check_resume_config(saved)

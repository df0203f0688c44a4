import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tdm_fast.config import TDMConfig
from tdm_fast.sampling import sample_student
from tdm_fast.demos.toy2d import NUM_CLASSES, ToyMLP, toy_denoiser
from tdm_fast.trainer import ClassConditions, TDMTrainer, make_student_and_fake


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return toy_denoiser(ToyMLP(hidden=32, depth=1))


def _trainer(teacher, out=None, **overrides):
    settings = dict(steps=(1, 2, 4), batch_size=16, iterations=6, fake_lr=1e-3, cfg_scale=3.0, kernels="reference")
    settings.update(overrides)
    return TDMTrainer(teacher, TDMConfig(**settings), ClassConditions(NUM_CLASSES), (2,), output_dir=out, progress=False)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.student_core.state_dict().items()}


def test_k_embeddings_learn_at_their_own_rate(teacher):
    trainer = _trainer(teacher, steps_embedding_lr_ratio=10.0)
    for opt, lr in ((trainer.opt_g, trainer.config.generator_lr), (trainer.opt_f, trainer.config.fake_lr)):
        main, steps = opt.param_groups
        assert main["initial_lr"] == pytest.approx(lr) and steps["initial_lr"] == pytest.approx(10 * lr)
        assert len(steps["params"]) == 1 and steps["params"][0].shape == (3, 32)
    assert len(_trainer(teacher, steps=(4,)).opt_g.param_groups) == 1  # no K embedding, one group


def test_k_is_drawn_by_steps_weights(teacher):
    """``steps_weights``: each iteration's K drawn with those relative probabilities (a weight 0 never),
    uniform without them; the weights survive the config's dict round trip."""
    def draws(trainer, n=400):
        return [trainer.config.steps[trainer._draw_steps_index()] for _ in range(n)]

    weighted = draws(_trainer(teacher, steps_weights=(1.0, 0.0, 3.0)))
    assert 2 not in weighted and abs(weighted.count(4) / len(weighted) - 0.75) < 0.07
    uniform = draws(_trainer(teacher))
    assert all(abs(uniform.count(k) / len(uniform) - 1 / 3) < 0.07 for k in (1, 2, 4))
    config = TDMConfig(steps=(1, 2, 4), steps_weights=(1, 1, 2))
    assert TDMConfig.from_dict(config.to_dict()).steps_weights == (1.0, 1.0, 2.0)
    history = _trainer(teacher, steps_weights=(0.0, 0.0, 1.0), iterations=3).train()
    assert [r["steps"] for r in history] == [4, 4, 4]


def test_steps_conditioned_student_starts_as_the_teacher(teacher):
    student, fake = make_student_and_fake(teacher, TDMConfig(steps=(1, 2, 4)))
    assert student.steps_set == (1, 2, 4) and fake.steps_set == (1, 2, 4)
    x, t, labels = torch.randn(5, 2), torch.tensor([899, 674, 449, 224, 30]), torch.tensor([0, 1, 0, 1, 2])
    for k in (1, 2, 4):
        for got, want in zip(student(x, t, labels, steps=k), teacher(x, t, labels)):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="not in the trained set"):
        student(x, t, labels, steps=3)


def test_training_changes_student_and_fake_not_teacher(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _trainer(teacher)
    history = trainer.train()
    assert [r["step"] for r in history] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor([r["fake_loss"], r["generator_loss"]])).all() for r in history)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    student_model = trainer.student_core.model.state_dict()
    assert any(not torch.equal(student_model[k], before["model." + k]) for k in student_model)
    assert trainer.student_core.steps_embedding.embedding.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        dict(matching="clean"),
        dict(importance_sampling=False),
        dict(tau_interval="full"),
        dict(huber_c=None, normalize=False),
        dict(steps=(4,), fake_updates=2, ema_decay=0.9, warmup_steps=3),
        dict(mixed_precision="bf16"),
        dict(guidance_min_sigma=1.0),
        dict(tau_min_sigma=1.0),
        dict(guidance_min_sigma=1.0, objective="fisher"),
    ],
)
def test_ablation_switches_train(teacher, overrides):
    history = _trainer(teacher, iterations=3, **overrides).train()
    assert len(history) == 3 and all(r["generator_loss"] == r["generator_loss"] for r in history)


def test_fused_and_reference_kernels_give_the_same_losses(teacher):
    runs = {}
    for choice in ("fused", "reference"):
        torch.manual_seed(0)
        runs[choice] = _trainer(teacher, kernels=choice, iterations=5).train()
    for fused, ref in zip(runs["fused"], runs["reference"]):
        assert fused["fake_loss"] == pytest.approx(ref["fake_loss"], rel=1e-4, abs=1e-6)
        assert fused["generator_loss"] == pytest.approx(ref["generator_loss"], rel=1e-4, abs=1e-6)


def test_resume_continues_exactly(teacher, tmp_path):
    straight = _trainer(teacher, tmp_path / "a", iterations=8, ema_decay=0.5)
    straight.train()

    first = _trainer(teacher, tmp_path / "b", iterations=8, ema_decay=0.5)
    first.train(iterations=4)
    first.save_checkpoint()
    second = _trainer(teacher, tmp_path / "b", iterations=8, ema_decay=0.5)
    second.load_checkpoint(tmp_path / "b")
    assert second.step == 4
    second.train()

    for k, v in _weights(straight).items():
        assert torch.equal(v, _weights(second)[k]), k
    for a, b in zip(straight.ema.shadow, second.ema.shadow):
        assert torch.equal(a, b)
    for a, b in zip(straight.fake_core.parameters(), second.fake_core.parameters()):
        assert torch.equal(a, b)


def test_keep_last_checkpoints(teacher, tmp_path):
    trainer = _trainer(teacher, tmp_path, iterations=6, checkpoint_every=1, keep_last=2)
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000005", "step-00000006"]
    assert (tmp_path / "student" / "denoiser.json").is_file()


def test_final_student_samples(teacher, tmp_path):
    trainer = _trainer(teacher, tmp_path, iterations=2)
    trainer.train()
    from tdm_fast.denoiser import Denoiser

    student = Denoiser.from_pretrained(tmp_path / "student")
    noise, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    final = trainer.final_student()  # the EMA weights, as saved
    for k in (1, 2, 4):
        torch.testing.assert_close(sample_student(student, noise, labels, k), sample_student(final, noise, labels, k))


def test_folders_saved_before_the_demos_moved_still_load(teacher, tmp_path):
    import json

    from tdm_fast.denoiser import Denoiser

    teacher.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "denoiser.json").read_text())
    assert config["model_class"] == "tdm_fast.demos.toy2d:ToyMLP"
    config["model_class"] = "tdm_fast.toy2d:ToyMLP"  # as written before the move
    (tmp_path / "denoiser.json").write_text(json.dumps(config))
    loaded = Denoiser.from_pretrained(tmp_path)
    x, t, c = torch.randn(3, 2), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 0])
    torch.testing.assert_close(loaded(x, t, c), teacher(x, t, c))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="matching"):
        TDMConfig(matching="blurry")
    with pytest.raises(ValueError, match="empty noise interval"):
        TDMConfig(steps=(64,))
    with pytest.raises(ValueError, match="unknown config keys"):
        TDMConfig.from_dict({"stepz": 4})
    with pytest.raises(ValueError, match="cfg_scale must be finite"):
        TDMConfig(cfg_scale=float("nan"))
    for bad in (-0.1, float("inf"), float("nan")):
        for name in ("guidance_min_sigma", "tau_min_sigma"):
            with pytest.raises(ValueError, match=name):
                TDMConfig(**{name: bad})
    for bad in (0.0, float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="guidance_max_sigma"):
            TDMConfig(guidance_max_sigma=bad)
    with pytest.raises(ValueError, match="guidance_max_sigma"):
        TDMConfig(guidance_min_sigma=2.0, guidance_max_sigma=1.0)


def test_mismatched_shapes_are_refused(teacher):
    with pytest.raises(ValueError, match="cond has batch"):
        teacher(torch.randn(3, 2), torch.tensor([10, 10, 10]), torch.tensor([0, 1]))

    class Squeezes(torch.nn.Module):
        def forward(self, x, t, cond):
            return x[:, :1]

    from tdm_fast.denoiser import Denoiser

    bad = Denoiser(Squeezes(), teacher.schedule, "epsilon", null_cond=2)
    with pytest.raises(ValueError, match="differs from x_t shape"):
        bad(torch.randn(3, 2), torch.tensor([10, 10, 10]), torch.tensor([0, 1, 0]))


def test_ema_weights_are_swapped_in_and_back(teacher):
    trainer = _trainer(teacher, iterations=3, ema_decay=0.5)
    trainer.train()
    training = [p.detach().clone() for p in trainer.ema.params]
    with trainer.ema_weights() as student:
        for p, s in zip(student.parameters(), trainer.ema.shadow):
            assert torch.equal(p, s)
    assert all(torch.equal(p, t) for p, t in zip(trainer.ema.params, training))
    assert any(not torch.equal(p, s) for p, s in zip(training, trainer.ema.shadow))
    final = trainer.final_student()
    assert all(torch.equal(p, s) for p, s in zip(final.parameters(), trainer.ema.shadow))


def test_deepspeed_is_refused_with_the_alternative(teacher, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="DeepSpeed is not supported.*--multi_gpu"):
        _trainer(teacher)


def test_mixed_precision_defaults_to_accelerates_setting(teacher, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = TDMConfig()
    assert config.mixed_precision is None and config.effective_mixed_precision == "bf16"
    assert _trainer(teacher).accelerator.mixed_precision == "bf16"
    assert TDMConfig(mixed_precision="no").effective_mixed_precision == "no"


class _HostReads(TorchDispatchMode):
    """Counts the ops that make the host read a tensor's value (on an accelerator: wait for the device)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_iterations_between_log_steps_never_read_the_device(teacher, tmp_path, kernels, monkeypatch):
    """Issue 14 item 7: losses, gradient norms and the non-finite guard stay on the device (a fused
    AdamW skips on a device flag); the host reads them at log steps only. The fused ops run their
    Triton launchers (interpreted), the code a GPU runs."""
    if kernels == "fused":
        monkeypatch.setenv("TDM_FAST_KERNELS", "triton")
    trainer = _trainer(teacher, tmp_path / "run", kernels=kernels, log_every=5, iterations=10, ema_decay=0.99,
                       gradient_accumulation_steps=2)
    reads_per_iteration, flushes = [], []
    iterate, records = trainer._iterate, trainer._records

    def counted_iterate():
        before = counter.count
        result = iterate()
        reads_per_iteration.append(counter.count - before)
        return result

    def counted_records(pending):
        flushes.append([it["step"] for it in pending])
        return records(pending)

    trainer._iterate, trainer._records = counted_iterate, counted_records
    with _HostReads() as counter:
        history = trainer.train()
    assert reads_per_iteration == [0] * 10
    assert flushes == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [r["step"] for r in history] == list(range(1, 11))
    assert all(r["generator_loss"] is not None and r["skipped_updates"] == 0 for r in history)


def test_a_device_skipped_update_equals_a_host_skipped_one(teacher):
    """The fused optimizer's on-device skip and the host check leave the same weights, moments and EMA."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = _trainer(teacher, ema_decay=0.9, iterations=3)
        for opt in (trainer.opt_g, trainer.opt_f):
            opt.optimizer.defaults["fused"] = fused
            for group in opt.optimizer.param_groups:
                group["fused"] = fused
        trainer.train(1)
        original = trainer.teacher.cond_uncond
        trainer.teacher.cond_uncond = lambda *a, **k: tuple((x * float("nan"), e) for x, e in original(*a, **k))
        assert trainer.train_step()["skipped_updates"] == 1
        trainer.teacher.cond_uncond = original
        trainer.train_step()
        results.append((_weights(trainer), [s.clone() for s in trainer.ema.shadow]))
    (w1, e1), (w2, e2) = results
    for a, b in zip(w1.values(), w2.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(e1, e2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dpmsolver_rollout_is_the_student_sampler_trajectory(teacher):
    """Issue 19: the rollout visits the states of sample_student(solver="dpmsolver") and keeps its x̂0s."""
    trainer = _trainer(teacher, steps=(4,), student_solver="dpmsolver")
    z, labels = torch.randn(8, 2), torch.randint(0, NUM_CLASSES, (8,))
    trajectory = trainer.rollout(z, labels, 4)
    assert trajectory.shape == (4 + 3 + 3, 8, 2)  # states, x̂0s, ε̂s
    _, states = sample_student(trainer.student_core, z, labels, 4, return_trajectory=True, solver="dpmsolver")
    torch.testing.assert_close(trajectory[:4], torch.stack(states), rtol=0, atol=1e-6)
    ddim = _trainer(teacher, steps=(4,)).rollout(z, labels, 4)  # the same untrained student, DDIM's trajectory
    assert ddim.shape[0] == 10 and torch.equal(ddim[1], trajectory[1]) and not torch.allclose(ddim[2], trajectory[2])
    x0, eps = trainer.student_core(trajectory[1], 674, labels)
    torch.testing.assert_close(trajectory[5], x0.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(trajectory[8], eps.float(), rtol=0, atol=1e-6)


def test_dpmsolver_matching_starts_from_the_trajectory(teacher):
    """The stage sample that noisy-sample matching diffuses lies on the solver's trajectory: the pair that
    stage_output hands to the matching, jumped to t_{k+1}, is the rollout's next state."""
    trainer = _trainer(teacher, steps=(4,), student_solver="dpmsolver", batch_size=64)
    z, labels = torch.randn(64, 2), torch.randint(0, NUM_CLASSES, (64,))
    trajectory = trainer.rollout(z, labels, 4)
    draw = trainer.draw_stage(trajectory, 4)
    x0, eps = trainer.student_core(draw.x_t, draw.t, labels)
    x0, eps = trainer.stage_output(x0.float(), eps.float(), draw)
    stage = (trainer.times[4].unsqueeze(0) == draw.t.unsqueeze(1)).int().argmax(1)
    inner = stage < 3
    assert inner.any() and (draw.coefficient[stage == 2] > 0).all()
    nxt = trainer.times[4][(stage + 1).clamp(max=3)]
    alpha, sigma = teacher.schedule(nxt)
    jumped = alpha[:, None] * x0 + sigma[:, None] * eps
    torch.testing.assert_close(jumped[inner], trajectory[stage + 1, torch.arange(64)][inner], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_dpmsolver_student_trains(teacher, kernels):
    history = _trainer(teacher, iterations=3, student_solver="dpmsolver", kernels=kernels).train()
    assert len(history) == 3 and all(r["generator_loss"] == r["generator_loss"] for r in history)


@pytest.mark.gpu
def test_a_cuda_iteration_never_synchronises(teacher, tmp_path):
    """The same claim on a GPU, with CUDA's own detector: any synchronising call between log steps fails."""
    trainer = TDMTrainer(teacher, TDMConfig(steps=(1, 2, 4), batch_size=16, iterations=6, log_every=3, fake_lr=1e-3, cfg_scale=3.0,
                                            ema_decay=0.99),
                         ClassConditions(NUM_CLASSES), (2,), output_dir=tmp_path / "run", progress=False)
    trainer.train(1)  # first calls: kernel builds and lazy initialisation may synchronise
    iterate = trainer._iterate

    def checked():
        torch.cuda.set_sync_debug_mode("error")
        try:
            return iterate()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer._iterate = checked
    assert [r["skipped_updates"] for r in trainer.train()] == [0] * 5


class _StraightforwardTrainer(TDMTrainer):
    """The fake-score update as first written: the student runs again on the whole drawn batch."""

    def student_prediction(self, trajectory, cond, draw, k):
        with torch.no_grad(), self.accelerator.autocast():
            x0, eps = self.student_core(draw.x_t, draw.t, cond, self._steps_arg(k))
        return x0.float(), eps.float()


@pytest.mark.parametrize("overrides", [{}, dict(steps=(4,), student_solver="dpmsolver", fake_updates=2, gradient_accumulation_steps=2),
                                       dict(objective="fisher", matching="clean")],
                         ids=["unify", "dpmsolver-accumulation", "fisher"])
def test_fake_update_reads_the_rollout_and_loses_nothing(teacher, overrides):
    """Issue 15 item 1: the fake-score update reads the student's x̂0, ε̂ from the rollout (only samples
    drawn at the last stage run the student): the same losses as running the student again, for a fixed
    seed over 20 iterations (fp32, CPU), with fewer student passes."""
    settings = dict(dict(steps=(1, 2, 4), batch_size=16, iterations=20, fake_lr=1e-3, cfg_scale=3.0, kernels="reference"), **overrides)
    runs = {}
    for cls in (TDMTrainer, _StraightforwardTrainer):
        trainer = cls(teacher, TDMConfig(**settings), ClassConditions(NUM_CLASSES), (2,), progress=False)
        passes = []
        trainer.student_core.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
        runs[cls] = trainer.train(), sum(passes)
    (reused, reused_passes), (straight, straight_passes) = runs[TDMTrainer], runs[_StraightforwardTrainer]
    for got, want in zip(reused, straight):
        assert got["steps"] == want["steps"]
        for key in ("fake_loss", "generator_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)
    assert reused_passes < straight_passes


def test_guidance_applies_above_its_noise_level_only(teacher):
    """With guidance_min_sigma the loss sees D_cfg on rows matched above the level and D_cond below it."""
    trainer = _trainer(teacher, guidance_min_sigma=1.0, cfg_scale=3.0)
    tau = torch.tensor([10, 300, 600, 990])
    alpha, sigma = teacher.schedule(tau)
    above = (sigma / alpha > 1.0)
    assert above.any() and not above.all()
    d_cond, d_uncond = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    target, _, scale = trainer.guidance(d_cond, d_uncond, tau)
    expected = torch.where(above[:, None], d_uncond + 3.0 * (d_cond - d_uncond), d_cond)
    assert scale == 1.0 and torch.allclose(target, expected)
    plain = _trainer(teacher, cfg_scale=3.0)
    assert plain.guidance(d_cond, d_uncond, tau) == (d_cond, d_uncond, 3.0)


@pytest.mark.parametrize("low", [0.0, 0.5])
def test_guidance_applies_below_its_upper_noise_level_only(teacher, low):
    """With guidance_max_sigma the rows matched at sigma/alpha above it (the top of the trajectory) see D_cond;
    with guidance_min_sigma too, only the rows between the two see D_cfg."""
    trainer = _trainer(teacher, guidance_min_sigma=low, guidance_max_sigma=5.0, cfg_scale=3.0)
    tau = torch.tensor([10, 300, 600, 850, 990])
    alpha, sigma = teacher.schedule(tau)
    level = sigma / alpha
    between = (level > low) & (level < 5.0)
    assert between.any() and (level >= 5.0).any()
    d_cond, d_uncond = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    target, _, scale = trainer.guidance(d_cond, d_uncond, tau)
    expected = torch.where(between[:, None], d_uncond + 3.0 * (d_cond - d_uncond), d_cond)
    assert scale == 1.0 and torch.allclose(target, expected)


def test_tau_floor_lifts_every_stage_above_the_noise_level(teacher):
    trainer = _trainer(teacher, tau_min_sigma=1.0)
    alpha, sigma = teacher.schedule(torch.tensor([trainer.tau_floor - 1, trainer.tau_floor]))
    assert sigma[0] / alpha[0] < 1.0 <= sigma[1] / alpha[1]
    trajectory = torch.zeros(3 * 4 - 2, 512, 2)
    draw = trainer.draw_stage(trajectory, 4)
    assert bool((draw.tau >= trainer.tau_floor).all()) and bool((draw.tau > draw.s).all())
    assert int(draw.tau.max()) < teacher.schedule.num_train_timesteps
    assert _trainer(teacher, tau_min_sigma=0.0).tau_floor == 0
    # a schedule that never gets that noisy keeps an interval at its top
    high = _trainer(teacher, tau_min_sigma=1e9)
    assert high.tau_floor == teacher.schedule.num_train_timesteps * 19 // 20
    tau = high.draw_stage(trajectory, 4).tau
    assert int(tau.min()) >= high.tau_floor and int(tau.max()) < teacher.schedule.num_train_timesteps

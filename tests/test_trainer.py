import pytest
import torch

from tdm_fast.config import TDMConfig
from tdm_fast.sampling import sample_student
from tdm_fast.toy2d import NUM_CLASSES, ToyMLP, toy_denoiser
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
    for k in (1, 2, 4):
        torch.testing.assert_close(
            sample_student(student, noise, labels, k), sample_student(trainer.student_core, noise, labels, k)
        )


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="matching"):
        TDMConfig(matching="blurry")
    with pytest.raises(ValueError, match="empty noise interval"):
        TDMConfig(steps=(64,))
    with pytest.raises(ValueError, match="unknown config keys"):
        TDMConfig.from_dict({"stepz": 4})
    with pytest.raises(ValueError, match="cfg_scale must be finite"):
        TDMConfig(cfg_scale=float("nan"))


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


@pytest.mark.parametrize("kind, message", [("DEEPSPEED", "DeepSpeed is not supported.*--multi_gpu"),
                                           ("FSDP", "FSDP is not supported yet.*--multi_gpu")])
def test_deepspeed_and_fsdp_are_refused_with_the_alternative(teacher, monkeypatch, kind, message):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: getattr(DistributedType, kind)))
    with pytest.raises(ValueError, match=message):
        _trainer(teacher)


def test_mixed_precision_defaults_to_accelerates_setting(teacher, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = TDMConfig()
    assert config.mixed_precision is None and config.effective_mixed_precision == "bf16"
    assert _trainer(teacher).accelerator.mixed_precision == "bf16"
    assert TDMConfig(mixed_precision="no").effective_mixed_precision == "no"

"""Trackers, validation grids and gradient accumulation (issue 14)."""
import pytest
import torch

from tdm_fast.cli import main
from tdm_fast.config import TDMConfig
from tdm_fast.demos.toy2d import NUM_CLASSES, ToyMLP, toy_denoiser
from tdm_fast.trainer import ClassConditions, TDMTrainer


def test_tensorboard_gets_losses_and_validation_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tdm_fast.demos.digits import digits_denoiser

    torch.manual_seed(0)
    digits_denoiser().save_pretrained(tmp_path / "teacher")  # image data: the grids are pictures
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(run), "--steps", "1", "2", "--iterations", "4",
                 "--batch-size", "8", "--cfg-scale", "2", "--kernels", "reference", "--log-every", "2", "--report-to",
                 "tensorboard", "--validation-every", "2", "--quiet"]) == 0
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["gap.json", "step-00000002.png", "step-00000004.png"]
    events = EventAccumulator(str(next((run / "tdm-fast").iterdir()).parent), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"fake_loss", "generator_loss", "grad_norm", "lr/generator", "lr/fake", "samples_per_s"} <= scalars
    assert [e.step for e in events.Scalars("generator_loss")] == [2, 4]
    assert {"validation/K=1", "validation/K=2"} <= set(events.Tags()["images"])
    image = events.Images("validation/K=2")[-1]
    assert image.step == 4 and image.width > 8 and image.height > 8


def test_validation_samples_fixed_inputs_with_the_ema_weights(teacher_dir, tmp_path):
    teacher = toy_denoiser(ToyMLP(hidden=32, depth=1))
    config = TDMConfig(steps=(1, 2), batch_size=16, iterations=2, fake_lr=1e-3, cfg_scale=3.0, kernels="reference",
                       ema_decay=0.5, validation_every=1)
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (2,), output_dir=tmp_path / "run", progress=False)
    trainer.train()
    with trainer.ema_weights() as student:
        first, _ = trainer.validation.run(student, config.steps, config.total_steps, device=trainer.device)
        again, _ = trainer.validation.run(student, config.steps, config.total_steps, device=trainer.device)
    assert all(torch.equal(first[k], again[k]) for k in (1, 2))  # fixed noise and conditions
    from tdm_fast.sampling import sample_student

    with trainer.ema_weights() as student:
        expected = sample_student(student, trainer.validation.noise, trainer.validation.conditions, 2)
    torch.testing.assert_close(first[2], ((expected + 1) / 2).clamp(0, 1))
    assert (tmp_path / "run" / "validation" / "step-00000002.png").stat().st_size > 0


def test_gradient_accumulation_steps_once_per_iteration_over_all_micro_batches(monkeypatch):
    teacher = toy_denoiser(ToyMLP(hidden=32, depth=1))
    config = TDMConfig(steps=(2,), batch_size=4, iterations=3, fake_lr=1e-3, cfg_scale=3.0, kernels="reference",
                       gradient_accumulation_steps=3)
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (2,), progress=False)
    rollouts, backwards = [], []
    original_rollout, original_backward = trainer.rollout, trainer.accelerator.backward
    monkeypatch.setattr(trainer, "rollout", lambda z, cond, k: rollouts.append(z.shape[0]) or original_rollout(z, cond, k))
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss: backwards.append(float(loss.detach())) or original_backward(loss))
    history = trainer.train()
    assert rollouts == [4] * 9  # three micro-batches of 4 per iteration
    assert len(backwards) == 3 * 2 * 3  # fake and generator backward per micro-batch
    assert [int(s["step"]) for s in trainer.opt_g.state_dict()["state"].values()][0] == 3  # one step per iteration
    # the logged loss is the mean over the micro-batches (each backward carries loss / 3)
    first_generator = backwards[3:6]
    assert history[0]["generator_loss"] == pytest.approx(sum(first_generator), rel=1e-6)

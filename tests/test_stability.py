"""The built-in teachers, the learning-rate schedule and the stability suite's pieces (issue 17)."""
import math

import pytest
import torch

from tdm_fast.config import PAPER_FAITHFUL, TDMConfig
from tdm_fast.demos.teachers import TEACHERS, DigitsDiT
from tdm_fast.denoiser import Denoiser
from tdm_fast.demos.digits import IMAGE_SIZE, NUM_CLASSES
from tdm_fast.eval.stability import fake_lag, format_stability, verdicts
from tdm_fast.trainer import ClassConditions, LRSchedule, TDMTrainer, make_student_and_fake


@pytest.mark.parametrize("name", [n for n in TEACHERS if n != "digits"])
def test_builtin_teachers_are_denoisers_of_digits(name, tmp_path):
    teacher = TEACHERS[name].fresh()
    x, t, labels = torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([5, 500, 990]), torch.tensor([0, 9, NUM_CLASSES])
    torch.nn.init.normal_(teacher.model.conv_out.weight if hasattr(teacher.model, "conv_out") else teacher.model.proj_out.weight)
    out = teacher.model(x, t, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    teacher.save_pretrained(tmp_path / name)
    loaded = Denoiser.from_pretrained(tmp_path / name)
    assert loaded.prediction_type == TEACHERS[name].prediction_type
    torch.testing.assert_close(loaded.model(x, t, labels), out)


def test_dit_steps_conditioned_student_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = TEACHERS["digits-dit"].fresh()
    for p in teacher.model.parameters():  # zero-initialised output layers would hide the embedding
        torch.nn.init.normal_(p, std=0.05)
    student, _ = make_student_and_fake(teacher, TDMConfig(steps=(1, 2, 4)))
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([899, 674, 449, 224]), torch.tensor([0, 1, 2, 10])
    for k in (1, 2, 4):
        torch.testing.assert_close(student(x, t, labels, steps=k)[0], teacher(x, t, labels)[0])


def test_dit_refuses_a_size_its_patches_do_not_tile():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DigitsDiT(sample_size=9)


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    schedule = LRSchedule(warmup=10, decay="cosine", total=110, floor=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    assert LRSchedule(warmup=0)(1000) == 1.0


def test_trainer_follows_the_cosine_decay():
    teacher = TEACHERS["digits-small-v"].fresh().eval().requires_grad_(False)
    config = TDMConfig(steps=(4,), cfg_scale=2.0, batch_size=4, iterations=4, warmup_steps=0, lr_decay="cosine",
                       kernels="reference")
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (1, 8, 8), progress=False)
    lrs = []
    for _ in range(4):
        trainer.train_step()
        lrs.append(trainer.opt_g.param_groups[0]["lr"] / config.generator_lr)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(1, 5)])


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        TDMConfig(lr_decay="linear")
    with pytest.raises(ValueError, match="lr_decay_floor"):
        TDMConfig(lr_decay_floor=1.5)


def test_paper_faithful_settings_are_the_authors():
    config = TDMConfig(**PAPER_FAITHFUL)
    assert config.generator_lr_ratio == 0.2 and config.fake_updates == 1 and config.ema_decay is None
    assert config.lr_decay == "constant" and config.warmup_steps == 0
    assert (config.adam_beta1, config.adam_beta2, config.weight_decay) == (0.0, 0.95, 1e-2)


def test_fake_lag_leaves_the_run_as_it_was():
    torch.manual_seed(0)
    teacher = TEACHERS["digits-small-v"].fresh().eval().requires_grad_(False)
    config = TDMConfig(steps=(1, 4), cfg_scale=2.0, batch_size=8, iterations=2, fake_lr=1e-3, kernels="reference")

    def run(probe: bool):
        trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (1, 8, 8), progress=False)
        trainer.train_step()
        lag = fake_lag(trainer, updates=3, probe_batches=1) if probe else None
        trainer.train_step()
        return trainer, lag

    probed, lag = run(True)
    plain, _ = run(False)
    assert set(lag) == {"K=1", "K=4"} and all(v["loss"] > 0 and v["converged"] > 0 for v in lag.values())
    for a, b in zip(probed.fake_core.parameters(), plain.fake_core.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(probed.student_core.parameters(), plain.student_core.parameters()):
        torch.testing.assert_close(a, b)


def _run(ratios_k4, multiplier=1.0, fids=None):
    points = [{"iteration": 0, **{f"K={k}": {"fid_teacher": 1.0, "ratio": 1.0} for k in (1, 2, 4)}}]
    for i, r in enumerate(ratios_k4):
        fid = fids[i] if fids else r
        points.append({"iteration": 200 * (i + 1), **{f"K={k}": {"fid_teacher": fid, "ratio": r} for k in (1, 2, 4)}})
    return {"teacher": "digits", "recipe": "default", "lr_multiplier": multiplier, "seed": 0, "points": points,
            "floor": 0.05, "baselines": {str(k): {"fid_teacher": 0.4} for k in (1, 2, 4)}}


def test_verdicts_apply_the_issue_checks():
    good = verdicts(_run([0.9, 0.6, 0.45, 0.4, 0.4]))
    assert all(good[1].values()) and all(good[4].values())
    drifting = verdicts(_run([0.9, 0.3, 0.3, 0.4, 0.45]))
    assert not drifting[4]["no drift (last <= 1.25 x best)"] and drifting[4]["ratio <= 0.5 from 600"]
    late = verdicts(_run([0.9, 1.2, 0.45, 0.4, 0.4]))
    assert not late[1]["ratio < 1 from 400"]
    scaled = verdicts(_run([0.9, 0.9, 0.9, 0.9, 1.1], multiplier=3.0))
    assert scaled[4] == {"ratio < 1 at 1000": False} and scaled[1] == {}


def test_stability_table_reports_every_run_and_check():
    runs = [_run([0.9, 0.6, 0.45, 0.4, 0.4]), _run([0.8, 0.5, 0.45, 0.42, 0.41])]
    runs[1]["seed"] = 1
    for run in runs:
        run["verdicts"] = verdicts(run)
    text = format_stability({"samples": 100, "every": 200, "runs": runs})
    assert "| digits | default | 1 | 4 | 0.12 | 2 |" in text
    assert "0.85 ± 0.07" in text and "**FAIL**" not in text


def test_a_resumed_sweep_keeps_its_finished_runs_and_adds_the_rest(tmp_path):
    import json

    from tdm_fast.eval.stability import _same_job, run_stability

    sweep = dict(teachers=("digits",), recipes={"default": {}}, multipliers=(1.0,), iterations=2, every=1, samples=16,
                 workers=1, progress=False)
    first = run_stability(tmp_path, seeds=(0,), **sweep)
    again = run_stability(tmp_path, seeds=(0,), resume=True, **sweep)  # nothing left to run
    assert again["resumed_runs"] == 1 and again["runs"][0]["points"] == json.loads(json.dumps(first["runs"][0]["points"]))
    wider = run_stability(tmp_path, seeds=(0, 1), resume=True, **sweep)
    assert [r["seed"] for r in wider["runs"]] == [0, 1] and wider["resumed_runs"] == 1 and wider["complete"]
    assert wider["runs"][0]["points"] == again["runs"][0]["points"]
    stored = json.loads((tmp_path / "stability.json").read_text())
    assert len(stored["runs"]) == 2 and "| digits | default | 1 | 4 |" in (tmp_path / "stability.md").read_text()
    job = ("digits", "default", {}, 1.0, 0, 2)
    assert _same_job(stored["runs"][0], job)
    assert not _same_job(stored["runs"][0], ("digits", "default", {}, 1.0, 0, 3))  # another iteration count
    assert not _same_job(stored["runs"][0], ("digits", "default", {"fake_lr": 1e-3}, 1.0, 0, 2))  # other settings
    fresh = run_stability(tmp_path / "other", seeds=(0,), resume=True, **sweep)  # nothing to resume from
    assert fresh["resumed_runs"] == 0


def test_the_digits_demo_runs_the_suites_default_recipe():
    from tdm_fast.demos.demo_digits import DEMO_ITERATIONS, demo_config, early_stop_config
    from tdm_fast.eval.stability import suite_config

    demo, suite = demo_config().to_dict(), suite_config("digits", DEMO_ITERATIONS, 0).to_dict()
    assert {k for k in demo if demo[k] != suite[k]} <= {"kernels", "log_every"}  # neither changes the numbers
    assert DEMO_ITERATIONS == TDMConfig().iterations
    former = early_stop_config()
    assert (former.iterations, former.fake_lr, former.tau_min_sigma, former.lr_decay) == (200, 1e-3, 0.0, "constant")

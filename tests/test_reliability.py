"""Nothing lost, nothing poisoned: non-finite guards, one writer per run folder, an atomic final
save, resume semantics and strict metrics (issue 16)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdm_fast.cli import main
from tdm_fast.config import TDMConfig
from tdm_fast.denoiser import Denoiser
from tdm_fast.demos.toy2d import NUM_CLASSES
from tdm_fast.trainer import ClassConditions, NonFiniteError, TDMTrainer

TINY = ["--batch-size", "16", "--fake-lr", "1e-3", "--cfg-scale", "3", "--kernels", "reference", "--quiet"]
SCRIPT = Path(__file__).parent / "scripts" / "kill_at_write.py"


def _distill(teacher_dir, out, *flags):
    return main(["distill", "--teacher", str(teacher_dir), "--out", str(out), *TINY, *map(str, flags)])


def _tensors_of(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def _all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for tensors in _tensors_of(folder).values() for t in tensors.values() if t.is_floating_point())


def _strict_rows(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# -- non-finite values -------------------------------------------------------------------------------
def test_nan_teacher_stops_the_run_and_nothing_non_finite_is_written(teacher_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert _distill(teacher_dir, run, "--iterations", 6, "--checkpoint-every", 3) == 0
    capsys.readouterr()

    original = Denoiser.cond_uncond

    def nan_above_800(self, x_t, t, cond, steps=None):  # a teacher that returns NaN for t > 800
        (x0_c, eps_c), (x0_u, eps_u) = original(self, x_t, t, cond, steps)
        bad = (torch.as_tensor(t) > 800).reshape(-1, *[1] * (x_t.dim() - 1))
        nan = torch.full_like(x0_c, math.nan)
        return (torch.where(bad, nan, x0_c), eps_c), (torch.where(bad, nan, x0_u), eps_u)

    monkeypatch.setattr(Denoiser, "cond_uncond", nan_above_800)
    code = _distill(teacher_dir, run, "--iterations", 200, "--checkpoint-every", 1, "--max-nonfinite-skips", 2, "--resume")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tdm-fast: error:")]
    assert code == 2 and len(err) == 1 and "non-finite" in err[0]
    assert _all_finite(run)
    rows = _strict_rows(run / "metrics.jsonl")
    assert any(r["skipped_updates"] for r in rows) and any(r["generator_loss"] is None for r in rows)
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert steps[-1] < 200

    monkeypatch.setattr(Denoiser, "cond_uncond", original)
    assert _distill(teacher_dir, run, "--iterations", steps[-1] + 2, "--resume") == 0  # the last finite checkpoint resumes
    assert _all_finite(run) and Denoiser.from_pretrained(run / "student") is not None


def test_weights_that_turn_non_finite_are_never_checkpointed(teacher_dir, tmp_path):
    teacher = Denoiser.from_pretrained(teacher_dir)
    config = TDMConfig(steps=(2,), batch_size=16, iterations=20, fake_lr=1e38, cfg_scale=3.0, kernels="reference",
                       checkpoint_every=1, max_nonfinite_skips=2)
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (2,), output_dir=tmp_path / "run", progress=False)
    with pytest.raises(NonFiniteError):
        trainer.train()
    assert _all_finite(tmp_path / "run")
    _strict_rows(tmp_path / "run" / "metrics.jsonl")


def test_a_skipped_update_leaves_weights_optimizer_and_ema_alone(teacher_dir):
    teacher = Denoiser.from_pretrained(teacher_dir)
    config = TDMConfig(steps=(2,), batch_size=16, iterations=3, fake_lr=1e-3, cfg_scale=3.0, kernels="reference", ema_decay=0.9)
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (2,), progress=False)
    trainer.train(1)
    before = {k: v.clone() for k, v in trainer.student_core.state_dict().items()}
    shadow = [s.clone() for s in trainer.ema.shadow]
    moments = {k: v.clone() for k, v in trainer.opt_g.state_dict()["state"][0].items()}
    original = trainer.teacher.cond_uncond
    trainer.teacher.cond_uncond = lambda *a, **k: tuple((x * math.nan, e) for x, e in original(*a, **k))
    record = trainer.train_step()
    assert record["generator_loss"] is None and record["skipped_updates"] == 1 and trainer.consecutive_skips == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.student_core.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema.shadow, shadow))
    assert all(torch.equal(v, moments[k]) for k, v in trainer.opt_g.state_dict()["state"][0].items())
    trainer.teacher.cond_uncond = original
    assert trainer.train_step()["skipped_updates"] == 0 and trainer.consecutive_skips == 0


# -- one writer per run folder ------------------------------------------------------------------------
def test_two_runs_on_one_folder_exactly_one_runs(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "tdm_fast", "distill", "--teacher", str(teacher_dir), "--out", str(run),
                              "--iterations", "100000", "--checkpoint-every", "5", *TINY], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((run / "checkpoints").glob("step-*")):
            time.sleep(0.05)
        assert list((run / "checkpoints").glob("step-*")), "the first run never checkpointed"
        for extra in ([], ["--resume"]):
            assert _distill(teacher_dir, run, "--iterations", 10, *extra) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by process {first.pid}" in err[0]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed holder's lock is stale: the folder is free again
    done = int(sorted((run / "checkpoints").glob("step-*"))[-1].name[5:])
    assert _distill(teacher_dir, run, "--iterations", done + 1, "--resume") == 0


# -- the final save under SIGKILL ---------------------------------------------------------------------
def _weights(student: Path) -> dict:
    return {name: tensors for name, tensors in _tensors_of(student).items()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sigkill_at_every_write_of_the_final_save_then_resume(teacher_dir, tmp_path, accumulation):
    args = ["distill", "--teacher", str(teacher_dir), "--iterations", "4", "--checkpoint-every", "2",
            "--gradient-accumulation-steps", str(accumulation), *TINY]
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *args, "--out", str(tmp_path / "straight")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    events = int(done.stdout.strip().splitlines()[-1].split("=")[1])
    assert events >= 8  # checkpoint files, their commit, the student's files and its rename
    assert sorted(p.name for p in tmp_path.glob("killed-*")) == sorted(f"killed-{n}" for n in range(events))
    expected = _weights(tmp_path / "straight" / "student")
    for n in range(events):
        run = tmp_path / f"killed-{n}"
        assert main([*args, "--out", str(run), "--resume"]) == 0, f"resume after a kill at event {n}"
        got = _weights(run / "student")
        assert got.keys() == expected.keys(), f"event {n}"
        for name in got:
            assert all(torch.equal(got[name][k], expected[name][k]) for k in expected[name]), f"event {n}: {name}"
        assert not list(run.glob(".student.*")), f"event {n}: leftovers"


# -- resume semantics ---------------------------------------------------------------------------------
def test_resume_refuses_changed_settings_unless_overridden(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(teacher_dir, run, "--iterations", 4, "--warmup-steps", 10) == 0
    capsys.readouterr()
    assert _distill(teacher_dir, run, "--iterations", 6, "--warmup-steps", 10, "--resume", "--fake-lr", "3e-3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake_lr 0.001 -> 0.003" in err[0] and "--override fake_lr" in err[0]
    assert _distill(teacher_dir, run, "--iterations", 6, "--resume", "--override", "steps") == 2
    assert "cannot change on resume" in capsys.readouterr().err

    teacher = Denoiser.from_pretrained(teacher_dir)
    config = TDMConfig(steps=(4,), batch_size=16, iterations=6, fake_lr=3e-3, cfg_scale=3.0, kernels="reference",
                       warmup_steps=10, weight_decay=0.05)
    trainer = TDMTrainer(teacher, config, ClassConditions(NUM_CLASSES), (2,), progress=False)
    trainer.load_checkpoint(run, overrides=("fake_lr", "weight_decay"))
    warm = 5 / 10  # the 5th step of a 10-step linear warm-up follows the 4 applied updates
    assert trainer.opt_f.param_groups[0]["lr"] == pytest.approx(3e-3 * warm)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(3e-3 * config.generator_lr_ratio * warm)
    assert trainer.opt_f.param_groups[0]["weight_decay"] == 0.05
    trainer.train()
    assert trainer.opt_f.param_groups[0]["lr"] == pytest.approx(3e-3 * 7 / 10)


def test_resume_cuts_metrics_back_to_the_checkpoint(teacher_dir, tmp_path):
    run = tmp_path / "run"
    assert _distill(teacher_dir, run, "--iterations", 6, "--checkpoint-every", 3, "--log-every", 1) == 0
    # as if the run had been killed after logging steps 4..6 but before its step-6 checkpoint
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "torn')
    assert _distill(teacher_dir, run, "--iterations", 8, "--log-every", 1, "--resume") == 0
    assert [r["step"] for r in _strict_rows(run / "metrics.jsonl")] == list(range(1, 9))

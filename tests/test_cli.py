"""The command line as a user meets it: subprocesses, exit codes, one-line errors, kill and resume."""
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


TINY = ["--batch-size", "16", "--fake-lr", "1e-3", "--cfg-scale", "3", "--kernels", "reference", "--quiet"]


def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "tdm_fast", *map(str, args)], capture_output=True, text=True, env=env, **kwargs)


def _error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert result.returncode != 0
    assert lines and lines[-1].startswith("tdm-fast: error:"), result.stderr
    return lines[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "positive integer"),
        (["--steps", "4", "--total-steps", "60"], "empty noise interval"),
        (["--matching", "blurry"], "--matching: invalid choice"),
        (["--sample-shape", "3"], "do not fit the teacher"),
    ],
)
def test_bad_settings_fail_with_one_line(teacher_dir, tmp_path, capsys, flags, message):
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_unknown_prediction_type_in_a_saved_teacher(teacher_dir, tmp_path, capsys):
    import json
    import shutil

    broken = tmp_path / "teacher"
    shutil.copytree(teacher_dir, broken)
    config = json.loads((broken / "denoiser.json").read_text())
    config["prediction_type"] = "score"
    (broken / "denoiser.json").write_text(json.dumps(config))
    assert main(["distill", "--teacher", str(broken), "--out", str(tmp_path / "run")]) == 2
    assert "unknown prediction_type 'score'" in capsys.readouterr().err


def test_resume_errors_leave_the_run_untouched(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--iterations", "2", *TINY]) == 0
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    # a second run into the same folder must not overwrite it
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--iterations", "4", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err

    # a missing checkpoint
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "x"), "--resume", str(tmp_path / "nowhere"), *TINY]) == 2
    assert "no checkpoint found" in capsys.readouterr().err

    # a corrupt checkpoint
    ckpt = next((run / "checkpoints").iterdir())
    (ckpt / "student.safetensors").write_bytes(b"garbage")
    snapshot[ckpt / "student.safetensors"] = b"garbage"
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--iterations", "4", "--resume", *TINY]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot


def test_sigkill_mid_run_then_resume(teacher_dir, tmp_path):
    iterations = 300  # the kill lands within a few iterations of the first checkpoint (25)
    args = ["distill", "--teacher", teacher_dir, "--iterations", iterations, "--checkpoint-every", 25, *TINY]
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tdm_fast", *map(str, args), "--out", str(run)], env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*")):
        time.sleep(0.05)
    time.sleep(0.3)  # let it get into the middle of a later checkpoint or iteration
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < iterations, "the run finished before it could be killed"

    resumed = _cli(*args, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = _cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    final = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert final.name == f"step-{iterations:08d}"
    a = load_file(final / "student.safetensors")
    b = load_file(tmp_path / "straight" / "checkpoints" / f"step-{iterations:08d}" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_writes_tensors_and_png(teacher_dir, tmp_path):
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "run"), "--iterations", "2", "--steps", "1", "2", *TINY]) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--steps", "2", "--num", "8", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    samples = load_file(tmp_path / "s.safetensors")["samples"]
    assert samples.shape == (8, 2) and torch.isfinite(samples).all()
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--steps", "4", "--out", str(tmp_path / "s")]) == 2


def test_sample_defaults_to_the_trained_solver(teacher_dir, tmp_path):
    """Issue 19: a run trained on the DPM-Solver trajectory samples on it unless --solver says otherwise."""
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--iterations", "2", "--steps", "3",
                 "--student-solver", "dpmsolver", *TINY]) == 0
    out = {}
    for name, flags in (("default", []), ("dpmsolver", ["--solver", "dpmsolver"]), ("ddim", ["--solver", "ddim"])):
        assert main(["sample", "--checkpoint", str(run), "--steps", "3", "--out", str(tmp_path / name), "--quiet", *flags]) == 0
        out[name] = load_file(tmp_path / f"{name}.safetensors")["samples"]
    assert torch.equal(out["default"], out["dpmsolver"]) and not torch.allclose(out["default"], out["ddim"])


def test_every_distill_flag_has_help_default_and_choices(capsys):
    import dataclasses

    from tdm_fast.config import CHOICES, TDMConfig

    assert main(["distill", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("TDM settings (override --config):"):]
    for field in dataclasses.fields(TDMConfig):
        flag = "--" + field.name.replace("_", "-")
        start = text.index(flag + " ") if flag + " " in text else text.index(flag + ",")
        entry = text[start:start + 400]
        assert "(default" in entry, flag
        if field.name in CHOICES:
            assert "{" + ",".join(CHOICES[field.name]) + "}" in entry, flag
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("tdm-fast ")


def test_sample_honours_engine_and_leaves_no_temporary_export(teacher_dir, tmp_path, monkeypatch):
    import tempfile

    from tdm_fast.export import onnx as onnx_export

    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--iterations", "2", "--steps", "2", *TINY]) == 0
    temporary = lambda: set(Path(tempfile.gettempdir()).glob("tdm_fast_onnx_*"))  # noqa: E731
    before = temporary()
    assert main(["sample", "--checkpoint", str(run), "--steps", "2", "--backend", "onnx", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert temporary() == before  # the on-the-fly export is removed once its session is built
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "graphs"), "--steps", "2", "--quiet"]) == 0

    def no_export(*args, **kwargs):
        raise AssertionError("--engine was given: nothing may be exported")

    monkeypatch.setattr(onnx_export, "export_sampler_onnx", no_export)
    assert main(["sample", "--checkpoint", str(run), "--steps", "2", "--backend", "onnx", "--engine", str(tmp_path / "graphs"),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = load_file(tmp_path / "a.safetensors")["samples"], load_file(tmp_path / "b.safetensors")["samples"]
    torch.testing.assert_close(a, b)

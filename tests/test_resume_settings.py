"""Issue 35 items 5-8: ``--resume`` starts from the run's own settings (flags beside it are changes), a
raised ``--iterations`` keeps the LR decay's length unless ``--override iterations`` stretches it, an
older checkpoint cannot be resumed in place (another --out can), ``elapsed_s`` continues, config.json
records the precision used, and a start-up summary goes through the ``tdm_fast`` logger."""
from __future__ import annotations

import json
import logging

from tdm_fast.checkpoint import unflatten
from tdm_fast.cli import main

TINY = ["--batch-size", "16", "--fake-lr", "1e-3", "--cfg-scale", "3", "--kernels", "reference", "--quiet"]
SETTINGS = ["--steps", "1", "2", "4", "--warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "1", "--keep-last", "0"]


def _distill(teacher_dir, out, *flags) -> int:
    return main(["distill", "--teacher", str(teacher_dir), "--out", str(out), *map(str, flags)])


def _state(run, step: int) -> dict:
    """The non-tensor part of a checkpoint (meta, LR schedule states)."""
    skeleton = json.loads((run / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())
    return {"meta": unflatten(skeleton["meta"], {}), "generator_lr": unflatten(skeleton["optimizers"]["__dict__"]["generator_lr"], {})}


def test_resume_takes_the_runs_settings_and_refuses_an_unnamed_change(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(teacher_dir, run, "--iterations", 2, *SETTINGS, *TINY) == 0
    assert json.loads((run / "config.json").read_text())["mixed_precision"] == "no"  # what ran, not null
    assert _distill(teacher_dir, run, "--resume", "--iterations", 3, "--quiet") == 0  # no --steps 1 2 4 retyped
    assert _state(run, 3)["meta"]["config"]["steps"] == [1, 2, 4]
    capsys.readouterr()
    assert _distill(teacher_dir, run, "--resume", "--iterations", 4, "--fake-lr", "2e-3", "--quiet") == 2
    assert "fake_lr 0.001 -> 0.002" in capsys.readouterr().err
    assert _distill(teacher_dir, run, "--resume", "--iterations", 4, "--fake-lr", "2e-3", "--override", "fake_lr", "--quiet") == 0
    assert _state(run, 4)["meta"]["config"]["fake_lr"] == 2e-3


def test_resume_alone_recalls_the_teacher_or_the_preset_flags(teacher_dir, tmp_path):
    """``--resume`` without --teacher / --preset --model --prompts: the run's run.json names them."""
    from tdm_fast.demos import t2i

    run = tmp_path / "run"
    assert _distill(teacher_dir, run, "--iterations", 1, *SETTINGS, *TINY) == 0
    assert main(["distill", "--out", str(run), "--resume", "--iterations", "2", "--quiet"]) == 0
    assert json.loads((run / "run.json").read_text())["teacher"] == str(teacher_dir.resolve())

    prompts = t2i.write_prompt_file(tmp_path / "prompts.txt")
    preset = tmp_path / "preset"
    assert main(["distill", "--preset", "sd15", "--model", str(t2i.shipped_pipeline("sd15")), "--prompts", str(prompts),
                 "--out", str(preset), "--resolution", "32", "--embedding-cache", "none", "--lora-rank", "2",
                 "--steps", "1", "2", "--iterations", "1", "--batch-size", "2", "--checkpoint-every", "1", "--quiet"]) == 0
    assert main(["distill", "--out", str(preset), "--resume", "--iterations", "2", "--quiet"]) == 0
    assert _state(preset, 2)["meta"]["config"]["steps"] == [1, 2]
    assert json.loads((preset / "run.json").read_text())["preset"]["lora_rank"] == 2
    assert (preset / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_raised_iterations_keep_the_decay_length_unless_overridden(teacher_dir, tmp_path):
    for name, extra in (("kept", []), ("stretched", ["--override", "iterations"])):
        run = tmp_path / name
        assert _distill(teacher_dir, run, "--iterations", 4, *SETTINGS, *TINY) == 0
        assert _distill(teacher_dir, run, "--resume", "--iterations", 8, *extra, "--quiet") == 0
    kept, stretched = _state(tmp_path / "kept", 6), _state(tmp_path / "stretched", 6)
    assert kept["meta"]["lr_decay_iterations"] == 4 and stretched["meta"]["lr_decay_iterations"] == 8
    assert kept["generator_lr"]["_last_lr"][0] == 0.0  # at the floor (0) past the original 4
    assert stretched["generator_lr"]["_last_lr"][0] > 0.0  # the cosine of 8 is not done at 6


def test_rewinding_in_place_says_to_use_another_out(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(teacher_dir, run, "--iterations", 4, *SETTINGS, *TINY) == 0
    older = run / "checkpoints" / "step-00000002"
    capsys.readouterr()
    assert _distill(teacher_dir, run, "--resume", older, "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer checkpoints (step-00000003, step-00000004)" in err[0] and "--out NEW_FOLDER" in err[0]
    assert _distill(teacher_dir, tmp_path / "rewound", "--resume", older, "--quiet") == 0
    assert _state(tmp_path / "rewound", 4)["meta"]["step"] == 4


def test_elapsed_time_continues_and_the_summary_is_logged(teacher_dir, tmp_path, caplog):
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="tdm_fast")
    assert _distill(teacher_dir, run, "--iterations", 2, *SETTINGS, *TINY) == 0
    said = " ".join(r.getMessage() for r in caplog.records if r.name == "tdm_fast")
    assert "student" in said and "trainable parameters" in said and "K in [1, 2, 4]" in said
    assert "effective batch 16" in said and "precision no" in said
    assert "memory before activations: weights" in said and "AdamW moments" in said
    before = _state(run, 2)["meta"]["elapsed_s"]
    assert before > 0
    assert _distill(teacher_dir, run, "--resume", "--iterations", 3, "--quiet") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["elapsed_s"] > before
    assert _state(run, 3)["meta"]["elapsed_s"] == rows[-1]["elapsed_s"]

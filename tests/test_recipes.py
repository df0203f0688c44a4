"""Issue 32: one recipe, where users get it. ``distill --preset`` with no recipe flags runs the measured
recipe (per parametrisation and prediction type), the pipeline demo runs exactly those defaults, and the
end of a run says per K whether the student is ahead of the teacher's best NFE-matched sampler."""
from __future__ import annotations

import json
import logging

import pytest

from tdm_fast.cli import build_parser, main
from tdm_fast.cli.distill import config_from_args, preset_recipe_of
from tdm_fast.config import TDMConfig
from tdm_fast.demos import t2i, t2i_demo
from tdm_fast.recipes import preset_config, steps_weights_for
from tdm_fast.validation import best_gaps, drift_report, gap_row


def _config(*flags: str) -> TDMConfig:
    args = build_parser().parse_args(["distill", "--out", "unused", *flags])
    return config_from_args(args, None, preset_recipe_of(args))


@pytest.mark.parametrize("pipeline", t2i.PIPELINES)
def test_the_demo_runs_exactly_what_distill_preset_gives_with_its_printed_flags(pipeline, tmp_path):
    """The demo's settings are the preset's defaults plus the size flags its metrics.md prints."""
    demo = t2i_demo.demo_config(pipeline)
    model = t2i.shipped_pipeline(pipeline)
    argv = t2i_demo.preset_argv(pipeline, model, tmp_path / "p.txt", tmp_path / "cache", config=demo)
    assert not {"--fake-lr", "--generator-lr-ratio", "--ema-decay", "--steps-weights", "--normalize",
                "--lr-decay", "--tau-min-sigma", "--cfg-scale", "--lora-rank", "--lora-targets"} & set(argv)
    assert _config(*argv).to_dict() == demo.to_dict()


def test_recipe_follows_the_parametrisation_and_the_prediction_type():
    sd15, sd3 = (str(t2i.shipped_pipeline(name)) for name in ("sd15", "sd3"))
    lora = _config("--preset", "sd15", "--model", sd15, "--prompts", "p.txt", "--steps", "1", "2", "4")
    assert (lora.fake_lr, lora.generator_lr_ratio, lora.ema_decay, lora.cfg_scale) == (3e-3, 0.2, 0.995, 4.5)
    assert lora.steps_weights == (1.0, 1.0, 4.0) and lora.normalize and lora.tau_min_sigma == 0.0
    assert (lora.warmup_steps, lora.lr_decay) == (50, "constant")
    full = _config("--preset", "sd15", "--model", sd15, "--prompts", "p.txt", "--full-finetune")
    assert (full.fake_lr, full.generator_lr_ratio, full.steps_weights) == (3e-4, 0.1, None)
    flow = _config("--preset", "sd3", "--model", sd3, "--prompts", "p.txt", "--steps", "2", "4")
    assert (flow.generator_lr_ratio, flow.ema_decay, flow.cfg_scale, flow.steps_weights) == (0.1, 0.99, 5.0, (1.0, 4.0))
    # a flow student's rates decay to 0 at the run's end: at constant rates its 4-step student walked past the teacher
    assert (flow.warmup_steps, flow.lr_decay, flow.lr_decay_floor) == (50, "cosine", 0.0)
    given = _config("--preset", "sd15", "--model", sd15, "--prompts", "p.txt", "--fake-lr", "1e-3", "--steps-weights", "1")
    assert (given.fake_lr, given.steps_weights, given.generator_lr_ratio) == (1e-3, (1.0,), 0.2)  # flags win
    assert preset_config("sd15", sd15, steps=(1, 2, 4)).to_dict() == lora.to_dict()
    # the saved-teacher path keeps TDMConfig's own defaults
    assert _config("--teacher", "t").to_dict() == TDMConfig().to_dict()


def test_a_config_file_overrides_only_what_it_names(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"fake_lr": 5e-4}))
    config = _config("--preset", "sd15", "--model", str(t2i.shipped_pipeline("sd15")), "--prompts", "p.txt",
                     "--config", str(file), "--steps", "1", "4")
    assert (config.fake_lr, config.generator_lr_ratio, config.steps_weights) == (5e-4, 0.2, (1.0, 4.0))


def test_the_largest_k_is_drawn_k_times_as_often():
    assert steps_weights_for((1, 2, 4)) == (1.0, 1.0, 4.0)
    assert steps_weights_for((4, 1)) == (4.0, 1.0)
    assert steps_weights_for((1, 2, 4, 8)) == (1.0, 1.0, 1.0, 8.0)
    assert steps_weights_for((4,)) is None


def test_the_run_reports_each_ks_gap_to_the_teachers_samplers(teacher_dir, tmp_path, caplog):
    """Every validation and the end of the run: distance to teacher-50 against the best NFE-matched sampler's,
    a warning for a K that is not ahead, and validation/gap.json."""
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="tdm_fast"):
        assert main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--steps", "1", "2", "--iterations", "2",
                     "--validation-every", "2", "--batch-size", "8", "--cfg-scale", "3", "--kernels", "reference",
                     "--quiet"]) == 0
    gap = json.loads((run / "validation" / "gap.json").read_text())
    assert gap["step"] == 2 and set(gap["baselines"]) == {"K=1", "K=2"}
    for k in (1, 2):
        assert gap[f"gap_k{k}"] == pytest.approx(gap[f"distance_k{k}"] / gap[f"baseline_distance_k{k}"])
    lines = [r for r in caplog.records if "teacher's 50-step samples" in r.getMessage()]
    assert {r.getMessage().split(":")[1].strip() for r in lines} == {"K=1", "K=2"}
    for record in lines:  # an untrained student is level with or behind its baseline: said as a warning
        k = int(record.getMessage().split("K=")[1][0])
        assert (record.levelno == logging.WARNING) == (gap[f"gap_k{k}"] >= 0.99)


def test_drift_is_a_gap_over_its_best_earlier_one():
    steps = (1, 4)
    history = [{"step": 100, "gap_k1": 0.9, "gap_k4": 0.47}, {"step": 200, "gap_k1": 0.7, "gap_k4": 0.50},
               {"step": 300, "gap_k1": 0.55, "gap_k4": 0.61}]
    assert best_gaps(history, steps) == {1: (300, 0.55), 4: (100, 0.47)}
    lines = drift_report(history, steps)  # K = 4: 0.61 > 1.1 x 0.47; K = 1 improves
    assert len(lines) == 1 and lines[0].startswith("K=4: gap 0.610 is 1.30x") and "step 100" in lines[0]
    assert drift_report(history[:2], steps) == []  # 0.50 is within DRIFT of 0.47
    assert drift_report(history[:1], steps) == [] and drift_report([], steps) == []
    assert gap_row(5, {"validation/gap_k1": 0.5, "validation/distance_k1": 2.0}, steps) == {"step": 5, "gap_k1": 0.5}


def _drifting_run(teacher_dir, run, *flags):
    """A student pushed away from its teacher by a learning rate far above any recipe's."""
    return main(["distill", "--teacher", str(teacher_dir), "--out", str(run), "--steps", "1", "2", "--validation-every", "10",
                 "--batch-size", "8", "--cfg-scale", "3", "--kernels", "reference", "--fake-lr", "0.1",
                 "--generator-lr-ratio", "1", "--warmup-steps", "0", "--ema-decay", "none", "--quiet", *flags])


def test_a_run_warns_when_a_k_drifts_away_from_its_best_gap_and_keeps_the_history(teacher_dir, tmp_path, caplog):
    """The gaps of every validation go to validation/gap.json (a resumed run reads them back, without the rows
    after its checkpoint); a K whose gap rises past DRIFT x its best earlier one is warned about."""
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="tdm_fast"):
        assert _drifting_run(teacher_dir, run, "--iterations", "20", "--checkpoint-every", "10") == 0
        first = json.loads((run / "validation" / "gap.json").read_text())["history"]
        assert [row["step"] for row in first] == [10, 20]
        assert _drifting_run(teacher_dir, run, "--iterations", "40", "--resume") == 0
    gap = json.loads((run / "validation" / "gap.json").read_text())
    history = gap["history"]
    assert [row["step"] for row in history] == [10, 20, 30, 40] and history[:2] == first
    assert gap["best"] == {f"K={k}": {"step": step, "gap": value} for k, (step, value) in best_gaps(history, (1, 2)).items()}
    warned = [r.getMessage() for r in caplog.records if "its best of the run" in r.getMessage()]
    expected = [f"validation at step {history[i]['step']}: {line}" for i in range(1, len(history))
                for line in drift_report(history[:i + 1], (1, 2))]
    assert expected and warned == expected  # the learning rate wrecks the student: at least one K drifts

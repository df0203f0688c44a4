"""Issue 35 item 9: ``--validation-prompt`` (repeatable) sets what a text model's validation grids show,
captioned with the prompts, at every K; ``Validation.run`` takes the student and settings as values."""
from __future__ import annotations

import numpy as np
import torch

from tdm_fast.cli import main
from tdm_fast.demos import t2i, t2i_demo
from tdm_fast.validation import Validation, save_validation

PROMPTS = ["a handwritten digit seven", "the number 3"]


def test_validation_prompts_are_sampled_and_captioned(tmp_path, monkeypatch):
    import tdm_fast.cli.distill as distill

    built = []
    real = distill._preset_validation
    monkeypatch.setattr(distill, "_preset_validation", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    model = t2i.shipped_pipeline("sd15")
    argv = t2i_demo.preset_argv("sd15", model, t2i.write_prompt_file(tmp_path / "p.txt"), tmp_path / "cache", rank=4)
    flags = ["--steps", "1", "2", "--iterations", "1", "--batch-size", "2", "--validation-every", "1", "--kernels", "reference",
             "--quiet", *[x for p in PROMPTS for x in ("--validation-prompt", p)]]
    assert main(["distill", *argv, *flags, "--out", str(tmp_path / "run")]) == 0
    validation = built[0]
    assert validation.captions == PROMPTS and validation.noise.shape[0] == 2 and validation.conditions.shape[0] == 2
    assert (tmp_path / "run" / "validation" / "step-00000001.png").is_file()


def test_validation_prompt_needs_a_text_model_and_validation_every(teacher_dir, tmp_path, capsys):
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "run"), "--validation-every", "1",
                 "--validation-prompt", "a cat"]) == 2
    assert "--validation-prompt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_takes_values_and_the_grid_is_captioned(tmp_path):
    from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser

    torch.manual_seed(0)
    student = toy_denoiser(ToyMLP(hidden=16, depth=1))
    validation = Validation(torch.zeros(3, dtype=torch.long), torch.randn(3, 2))
    points, _ = validation.run(student, steps=(1, 2), total_steps=900)
    assert set(points) == {1, 2} and points[1].shape == (3, 2)
    images = {k: torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in (1, 2)}
    plain = save_validation(images, tmp_path / "plain.png", 1)
    captioned = save_validation(images, tmp_path / "captioned.png", 1, ["one", "two", "three"])
    assert all(np.array_equal(plain[k], captioned[k]) for k in plain)  # the same grids, with labels drawn on the figure
    assert (tmp_path / "captioned.png").read_bytes() != (tmp_path / "plain.png").read_bytes()

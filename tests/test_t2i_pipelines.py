"""The shipped digits text-to-image pipelines (tdm_fast.demos.t2i): stock diffusers classes, offline,
recognisable digits with CFG; the builder CLI writes a folder the stock pipeline loads."""
from __future__ import annotations

import json

import pytest
import torch

from tdm_fast.cli import main
from tdm_fast.demos import t2i
from tdm_fast.eval.classifier import accuracy, load_classifier


def _stock(name, path):
    import diffusers

    if name == "sd15":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                                requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", t2i.PIPELINES)
def test_shipped_pipeline_draws_the_prompted_digit(name):
    """The shipped folder loads offline with the stock class; 40 balanced prompts at 20 steps with CFG
    are classified as their digit by the shipped digits classifier (the 50-step accuracy is in build.json)."""
    path = t2i.shipped_pipeline(name)
    assert not list(path.rglob("*.bin")) and list(path.rglob("*.safetensors"))  # safetensors only
    pipe = _stock(name, path)
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.in_channels == 1
    if name == "sd3":
        assert pipe.text_encoder_3 is not None and pipe.vae.config.shift_factor is not None
        assert pipe.scheduler.config.shift == 3.0
    prompts, labels, latents = t2i.eval_prompts(40, seed=1)
    extra = {"max_sequence_length": t2i.T5_LENGTH} if name == "sd3" else {}
    with torch.no_grad():
        images = pipe(prompt=prompts, latents=latents, num_inference_steps=20, guidance_scale=t2i.SD15_CFG if name == "sd15" else t2i.SD3_CFG,
                      height=16, width=16, output_type="pt", **extra).images
    assert images.shape == (40, 1, 16, 16)
    acc = accuracy(load_classifier(), t2i.to_digits8(images * 2 - 1), labels)
    assert acc >= 0.85, acc
    build = json.loads((path / "build.json").read_text())
    assert build["eval"]["steps"] == 50 and build["eval"]["accuracy"] >= 0.9


def test_prompts_and_tokenizers():
    prompts, labels = t2i.prompt_table()
    assert len(prompts) == 10 * len(t2i.TEMPLATES) and len(set(prompts)) == len(prompts)
    assert "a handwritten digit seven" in prompts and "the number 7" in prompts
    tok = t2i.clip_tokenizer()
    for word in t2i.vocabulary():  # one token per word (the builder also checks this)
        assert tok.tokenize(word) == [word + "</w>"]
    assert max(len(tok(p).input_ids) for p in prompts) <= t2i.CLIP_LENGTH
    t5 = t2i.t5_tokenizer()
    assert t5.unk_token_id not in t5(" ".join(t2i.vocabulary())).input_ids
    images, _ = t2i.load_t2i_images("heldout")
    assert images.shape[1:] == (1, 16, 16)
    from tdm_fast.demos.digits import load_digits_tensors

    torch.testing.assert_close(t2i.to_digits8(images), load_digits_tensors("heldout")[0])  # pooling undoes the upsampling


@pytest.mark.parametrize("name", t2i.PIPELINES)
def test_builder_cli_writes_a_stock_pipeline_folder(name, tmp_path):
    out = tmp_path / name
    rc = main(["--quiet", "teacher", "train", "--dataset", "digits-t2i", "--pipeline", name, "--out", str(out),
               "--iterations", "2", "--vae-iterations", "2", "--batch-size", "8", "--threads", "2"])
    assert rc == 0
    build = json.loads((out / "build.json").read_text())
    assert build["denoiser"]["iterations"] == 2 and build["pipeline"] == name and build["build_wall_s"] > 0
    pipe = _stock(name, out)
    extra = {"max_sequence_length": t2i.T5_LENGTH} if name == "sd3" else {}
    with torch.no_grad():
        images = pipe(prompt=["the number 3", "a handwritten digit nine"], num_inference_steps=2, guidance_scale=4.0, height=16,
                      width=16, output_type="pt", **extra).images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_builder_cli_refuses_pipeline_for_other_datasets(tmp_path, capsys):
    assert main(["teacher", "train", "--dataset", "digits", "--pipeline", "sd15", "--out", str(tmp_path / "x")]) == 2
    assert "--pipeline" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["teacher", "train", "--dataset", "digits-t2i", "--out", str(tmp_path / "y")]) == 2
    assert "needs --pipeline" in capsys.readouterr().err and not (tmp_path / "y").exists()

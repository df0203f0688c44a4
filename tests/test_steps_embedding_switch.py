"""Issue 35 item 1: the K embedding folded into a stock pipeline's UNet by ``apply_steps_embedding`` can be
switched (K = 4 -> 2 -> 4 gives each K's student, not base + e4 + e2) and removed (the pipeline's
``unload_lora_weights()`` and ``remove_steps_embedding`` give back the base bit for bit); the run's
``lora/scheduler`` records the trained K set and warns once for another step count. Shipped tiny SD1.5."""
from __future__ import annotations

import warnings

import pytest
import torch

from _lora_student import random_lora_run
from tdm_fast.demos import t2i, t2i_demo
from tdm_fast.lora import apply_steps_embedding, remove_steps_embedding
from tdm_fast.scheduler import TDMScheduler

STEPS = (1, 2, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shipped pipeline and the lora/ folder of a steps-aware LoRA student with random LoRA and K weights."""
    model, root = random_lora_run("sd15", tmp_path_factory.mktemp("steps-switch"), STEPS)
    return model, root / "lora"


@torch.no_grad()
def _latents(pipe, steps: int) -> torch.Tensor:
    prompts, _, latents = t2i.eval_prompts(2, 0)
    return t2i.generate(pipe, prompts, latents, steps, 1.0, output_type="latent")


def _state(pipe) -> dict:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_switching_k_gives_each_k_student_and_unloading_gives_the_base_bit_for_bit(run):
    model, lora = run
    pipe = t2i_demo.load_stock(model)
    base = _state(pipe)
    pipe.scheduler = TDMScheduler.from_pretrained(lora, subfolder="scheduler")
    pipe.load_lora_weights(str(lora))
    diffs = []
    for k in (4, 2, 4):
        apply_steps_embedding(pipe.unet, lora, steps=k)
        fresh = t2i_demo.load_student_pipeline(model, lora, k)
        fresh.scheduler = TDMScheduler.from_pretrained(lora, subfolder="scheduler")
        diffs.append((k, float((_latents(pipe, k) - _latents(fresh, k)).abs().max())))
        assert diffs[-1][1] <= 1e-5, diffs  # fp32 rounding; base + e4 + e2 is ~1e-2 off
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert "unload_lora" not in pipe.unet.__dict__  # the class's own unload again
    print(f"max |Δ| vs a fresh load per K switch: {diffs}")


def test_remove_steps_embedding_restores_the_base_bias_without_unloading_the_lora(run):
    model, lora = run
    pipe = t2i_demo.load_stock(model)
    pipe.load_lora_weights(str(lora))
    with_lora = _state(pipe)
    apply_steps_embedding(pipe.unet, lora, steps=2)
    apply_steps_embedding(pipe.unet, lora, steps=1)
    assert not all(torch.equal(v, with_lora[k]) for k, v in pipe.unet.state_dict().items())
    assert remove_steps_embedding(pipe.unet)
    assert all(torch.equal(v, with_lora[k]) for k, v in pipe.unet.state_dict().items())
    assert not remove_steps_embedding(pipe.unet)


def test_the_lora_scheduler_records_the_trained_k_set_and_warns_once_outside_it(run):
    _, lora = run
    scheduler = TDMScheduler.from_pretrained(lora, subfolder="scheduler")
    assert list(scheduler.config.trained_steps) == list(STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler.set_timesteps(2)
        scheduler.set_timesteps(3)
        scheduler.set_timesteps(3)
    said = [str(w.message) for w in caught if "distilled for K" in str(w.message)]
    assert len(said) == 1 and "num_inference_steps=3" in said[0] and "[1, 2, 4]" in said[0]

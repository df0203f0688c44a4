"""Real diffusers backbones end to end on tiny random pipelines (no downloads): preset loading,
3 LoRA TDM iterations, LoRA export into the stock pipeline, TDMScheduler parity with our sampler."""
from __future__ import annotations

import dataclasses
import pytest
import torch

import _backbone_tiny as tiny
from tdm_fast.backbones.run import build_preset_run, export_preset_student
from tdm_fast.backbones.presets import get_preset, missing_components, prompt_conditions
from tdm_fast.config import TDMConfig
from tdm_fast.lora import LoRARole, merged_denoiser
from tdm_fast.sampling import sample_student
from tdm_fast.trainer import TDMTrainer

PRESETS = ["sd15", "sdxl", "pixart", "sd3", "cogvideox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = {}

    def run(preset, rotary=False):
        key = (preset, rotary)
        if key not in cache:
            root = tmp_path_factory.mktemp(preset + ("-rope" if rotary else ""))
            if rotary:
                tiny.build_cogvideox(root / "model", rotary=True)
            else:
                tiny.BUILDERS[preset](root / "model")
            args = tiny.preset_args(preset, root / "model", tiny.write_prompts(root / "prompts.txt"), embedding_cache=str(root / "cache"))
            config = TDMConfig(steps=(4,), batch_size=2, iterations=3, cfg_scale=2.0, fake_lr=1e-2, kernels="reference", log_every=1,
                               ema_decay=None)  # the trained weights are the saved ones
            teacher, student, fake, conditions, shape = build_preset_run(args, config)
            base = teacher.model.shared.adapter
            before = {
                "student": {k: v.clone() for k, v in student.state_dict().items()},
                "fake": {k: v.clone() for k, v in fake.state_dict().items()},
                "base": {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k},
            }
            trainer = TDMTrainer(teacher, config, conditions, shape, root / "out", student, fake, progress=False)
            history = trainer.train()
            cache[key] = dict(root=root, args=args, config=config, trainer=trainer, before=before, history=history,
                              shape=shape, teacher=teacher, student=student, fake=fake)
        return cache[key]

    return run


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_lora_training_changes_student_not_teacher(trained, preset):
    r = trained(preset)
    assert len(r["history"]) == 3 and all(torch.isfinite(torch.tensor(h["generator_loss"])) for h in r["history"])
    student, fake = r["student"], r["fake"]
    assert isinstance(student.model, LoRARole) and student.model.shared is r["teacher"].model.shared  # one base
    s_after = student.state_dict()
    assert s_after and all("lora" in k for k in s_after)  # the student registers only its LoRA weights
    changed = [k for k, v in s_after.items() if not torch.equal(v, r["before"]["student"][k])]
    assert len(changed) >= len(s_after) // 2
    assert any(not torch.equal(v, r["before"]["fake"][k]) for k, v in fake.state_dict().items())
    base_after = r["teacher"].model.shared.adapter.state_dict()
    assert all(torch.equal(base_after[k], v) for k, v in r["before"]["base"].items())
    # the trainer's final student round-trips through Denoiser.save_pretrained / from_pretrained
    from tdm_fast.denoiser import Denoiser

    reloaded = Denoiser.from_pretrained(r["root"] / "out" / "student")
    cond = r["trainer"].conditions(1, torch.Generator().manual_seed(0))
    z = torch.randn(1, *r["shape"])
    torch.testing.assert_close(sample_student(reloaded, z, cond, 4), sample_student(student, z, cond, 4), rtol=1e-5, atol=1e-5)


def _pipeline_latents(preset, r, steps, latents, prompts, solver="ddim"):
    import diffusers

    from tdm_fast.lora import load_lora_adapter
    from tdm_fast.scheduler import TDMScheduler

    p = get_preset(preset)
    cls = getattr(diffusers, p.pipeline)
    model_dir = r["root"] / "model"
    pipe = cls.from_pretrained(model_dir, **missing_components(model_dir, cls))
    pipe.scheduler = TDMScheduler.from_config(pipe.scheduler.config, solver=solver)
    lora_dir = r["root"] / "export" / "lora"
    if preset == "pixart":
        load_lora_adapter(pipe.transformer, lora_dir)
    else:
        pipe.load_lora_weights(lora_dir)
    kwargs = dict(num_inference_steps=steps, guidance_scale=1.0, latents=latents, output_type="latent", height=64, width=64)
    if preset == "cogvideox":
        # latents are (B, F, C, H, W); 5 frames -> (5 - 1) // 4 + 1 = 2 latent frames
        kwargs.update(num_frames=r["args"].num_frames, use_dynamic_cfg=False, max_sequence_length=16)
    if preset == "pixart":
        kwargs.update(use_resolution_binning=False, max_sequence_length=16)
    if preset == "sd3":
        kwargs.update(max_sequence_length=16)
    with torch.no_grad():
        out = pipe(prompt=prompts, **kwargs)
    return out.frames if preset == "cogvideox" else out.images


@pytest.mark.parametrize("case", ["sd15", "sdxl", "pixart", "sd3", "cogvideox", "cogvideox-rope"])
def test_exported_lora_samples_in_stock_pipeline(trained, case):
    # cogvideox-rope: CogVideoX-5B-style rotary embeddings, built by the pipeline and by our adapter
    preset, _, variant = case.partition("-")
    r = trained(preset, rotary=variant == "rope")
    out = export_preset_student(r["args"], r["student"], r["config"], r["root"] / "export")
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "lora" / "README.md").read_text()
    assert "TDMScheduler" in card and "guidance_scale=1" in card and "num_inference_steps=4" in card
    prompts = ["a photo of a cat", "a red car"]
    cond, _ = prompt_conditions(preset, r["root"] / "model", prompts, r["teacher"].model.shared.adapter.inner, 64,
                                cache_dir=None, max_sequence_length=r["args"].max_sequence_length)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn((2, *r["shape"]), generator=g)
    for steps in (1, 2, 4):
        images = _pipeline_latents(preset, r, steps, latents.clone(), prompts)
        assert images.shape == latents.shape and torch.isfinite(images).all()
        if steps == 4:
            ours = sample_student(r["student"], latents.clone(), cond, 4)
            torch.testing.assert_close(images, ours, rtol=1e-4, atol=1e-5)
    # issue 19: TDMScheduler(solver="dpmsolver") in the stock pipeline is our DPM-Solver++(2M) trajectory
    images = _pipeline_latents(preset, r, 4, latents.clone(), prompts, solver="dpmsolver")
    ours = sample_student(r["student"], latents.clone(), cond, 4, solver="dpmsolver")
    torch.testing.assert_close(images, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["sd3", "pixart", "cogvideox-rope"])
def test_lora_student_exports_to_onnx_merged(trained, case, tmp_path):
    """A LoRA-role student (one base shared with teacher and fake score) exports with its LoRA merged
    into the weights: no LoRA tensor in the graph, and ONNX Runtime matches the torch sampler (PixArt:
    with its T5 padding mask, at another batch than the traced one)."""
    import onnx

    from tdm_fast.export.cli import relative_error
    from tdm_fast.export.onnx import export_sampler_onnx
    from tdm_fast.export.runtime import OrtSampler

    preset, _, variant = case.partition("-")
    r = trained(preset, rotary=variant == "rope")
    cond = r["trainer"].conditions(2, torch.Generator().manual_seed(1))
    noise = torch.randn(2, *r["shape"], generator=torch.Generator().manual_seed(2))
    export_sampler_onnx(r["student"], tmp_path / "student.onnx", 4, noise, cond)
    names = [i.name for i in onnx.load(tmp_path / "student.onnx").graph.initializer]
    assert names and not any("lora" in n for n in names)
    runner = OrtSampler(tmp_path / "student.onnx")
    for b in (2, 3):
        cond_b = r["trainer"].conditions(b, torch.Generator().manual_seed(b))
        noise_b = torch.randn(b, *r["shape"], generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = sample_student(r["student"], noise_b, cond_b, 4)
        assert relative_error(runner(noise_b, cond_b), ref) <= 1e-4
    if preset == "pixart":
        assert (cond["encoder_attention_mask"] == 0).any()  # the mask is exercised


def test_cogvideox_export_names_its_native_size(trained, tmp_path):
    """CogVideoX-2B-style sin-cos positions are rebuilt with numpy off the native size: say so up front."""
    from tdm_fast.export.onnx import export_sampler_onnx

    r = trained("cogvideox")
    cond = r["trainer"].conditions(2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"native latent \(frames, height, width\) = \(3, 8, 8\) only, got \(2, 8, 8\)"):
        export_sampler_onnx(r["student"], tmp_path / "c.onnx", 4, torch.randn(2, *r["shape"]), cond)


def test_lora_roles_with_gradient_checkpointing_bf16_unify_and_ema(tmp_path):
    """The memory savers together on the tiny SD1.5 preset: checkpointed LoRA roles, bf16 base, K embedding, EMA."""
    tiny.BUILDERS["sd15"](tmp_path / "model")
    args = tiny.preset_args("sd15", tmp_path / "model", tiny.write_prompts(tmp_path / "prompts.txt"), embedding_cache=str(tmp_path / "cache"))
    args = dataclasses.replace(args, gradient_checkpointing=True)
    config = TDMConfig(steps=(1, 2, 4), batch_size=2, iterations=3, cfg_scale=2.0, fake_lr=1e-2, kernels="reference",
                       mixed_precision="bf16", ema_decay=0.5)
    teacher, student, fake, conditions, shape = build_preset_run(args, config)
    assert teacher.model.shared.adapter.inner.is_gradient_checkpointing
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = TDMTrainer(teacher, config, conditions, shape, tmp_path / "out", student, fake, progress=False)
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([h["generator_loss"], h["fake_loss"]])).all() for h in history)
    after = student.state_dict()
    assert any("steps_embedding" in k for k in after)
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if "lora" in k)
    z, cond = torch.randn(1, *shape), conditions(1, torch.Generator().manual_seed(0))
    with trainer.ema_weights() as ema_student:
        assert torch.isfinite(sample_student(ema_student, z, cond, 2)).all()
    # what export traces: the LoRA merged into a copy of the (bf16) base, K embedding kept
    merged = merged_denoiser(student)
    assert merged.steps_set == student.steps_set and not any("lora" in k for k in merged.state_dict())
    from tdm_fast.export.cli import relative_error

    for k in (1, 4):  # the LoRA student runs under bf16 autocast (accelerate), the merged one in fp32
        assert relative_error(sample_student(merged, z, cond, k), sample_student(student, z, cond, k)) <= 5e-2


def test_same_seed_gives_the_same_lora_run(tmp_path):
    """`--seed` fixes the LoRA initialisation too: two runs give the same first losses and weights."""
    from safetensors.torch import load_file

    from tdm_fast.cli import main

    model = tiny.build_sd15(tmp_path / "model")
    prompts = tiny.write_prompts(tmp_path / "prompts.txt")
    common = ["distill", "--preset", "sd15", "--model", str(model), "--prompts", str(prompts), "--resolution", "64",
              "--lora-rank", "4", "--iterations", "1", "--batch-size", "2", "--log-every", "1", "--kernels", "reference",
              "--embedding-cache", str(tmp_path / "cache"), "--quiet"]
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main([*common, "--seed", str(seed), "--out", str(tmp_path / run)]) == 0
    rows = {r: (tmp_path / r / "metrics.jsonl").read_text().splitlines()[0] for r in "abc"}
    weights = {r: load_file(tmp_path / r / "checkpoints" / "step-00000001" / "student.safetensors") for r in "abc"}
    strip = lambda row: {k: v for k, v in __import__("json").loads(row).items() if k != "elapsed_s"}  # noqa: E731
    assert strip(rows["a"]) == strip(rows["b"])
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])

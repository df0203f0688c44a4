"""Bring a TDM checkpoint (issue 34): each official format, built synthetically on the shipped tiny pipelines,
converted and sampled with TDMScheduler, equals the authors' path (stock pipeline, the stock scheduler of the
release's README, the official loading steps) to fp32 rounding at K = 1, 2, 4."""
import json
import shutil

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DPMSolverMultistepScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from tdm_fast.convert import EMA_TARGETS, SANA_DPMSOLVER, Recipe, convert_checkpoint
from tdm_fast.demos.t2i import eval_prompts, generate, load_pipeline, shipped_pipeline
from tdm_fast.scheduler import TDMScheduler
from tdm_fast.usage import UsageError

STEPS = (1, 2, 4)
COGVIDEOX_DDIM = {  # CogVideoX-2b's scheduler config: v-prediction, zero terminal SNR, SNR shift 3, trailing
    "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing",
}
PROMPTS, _, LATENTS = eval_prompts(2, seed=3)


def random_lora(model, config: LoraConfig, seed: int, std: float = 0.1) -> dict:
    """Adds ``config`` as a LoRA with random (non-zero) weights of ``std`` to ``model``; returns its peft state dict
    (0.1: a LoRA-sized change of the base; 0.3 moves the sample enough that a float64 noise table, where the
    stock scheduler's is float32, shows at 1e-4)."""
    model.add_adapter(config, adapter_name="made")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return get_peft_model_state_dict(model, adapter_name="made")


def sample(pipe, scheduler, steps: int) -> torch.Tensor:
    pipe.scheduler = scheduler
    return generate(pipe, PROMPTS, LATENTS, steps, guidance_scale=1.0, output_type="latent")


def ours(out, base, steps):
    pipe = load_pipeline(base)
    pipe.load_lora_weights(str(out))  # scale 1: the authors' scale is in the alpha
    return sample(pipe, TDMScheduler.from_pretrained(out, subfolder="scheduler"), steps)


def stock_scheduler(stock_config: dict):
    return getattr(__import__("diffusers"), stock_config["_class_name"]).from_config(
        {k: v for k, v in stock_config.items() if k != "_class_name"})


def assert_reproduced(authors_pipe, stock_config: dict, out, base, label: str):
    for steps in STEPS:
        expected = sample(authors_pipe, stock_scheduler(stock_config), steps)
        got = ours(out, base, steps)
        diff = (got - expected).abs().max().item()
        print(f"{label} K={steps}: max |diff| = {diff:.2e}")
        assert diff <= 1e-5, (label, steps, diff)


@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory):
    """TDM-SD3-LoRA's format: a diffusers LoRA (transformer.*.lora_A/B, no alphas) for the README's scale 0.125."""
    folder = tmp_path_factory.mktemp("sd3_lora")
    pipe = load_pipeline("sd3")
    state = random_lora(pipe.transformer, LoraConfig(r=4, lora_alpha=4, target_modules=list(EMA_TARGETS)), seed=1)
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state)
    return folder / "pytorch_lora_weights.safetensors"


def test_sd3_diffusers_lora_with_scale(sd3_lora, tmp_path):
    out = convert_checkpoint(sd3_lora, shipped_pipeline("sd3"), tmp_path / "student", "tdm-sd3")
    authors = load_pipeline("sd3")
    authors.load_lora_weights(str(sd3_lora.parent), adapter_name="tdm")
    authors.set_adapters(["tdm"], adapter_weights=[0.125])
    assert_reproduced(authors, dict(SANA_DPMSOLVER, flow_shift=6.0), out, "sd3", "TDM-SD3-LoRA (diffusers, scale 0.125)")
    scheduler = TDMScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 947, 856, 666]
    assert (out / "README.md").is_file() and (out / "student" / "denoiser.json").is_file()


def kohya_release(tmp_path, suffix: str, std: float):
    """TDM-Dreamshaper-v7's format: kohya names (lora_unet_*, lora_down/up, .alpha with alpha != rank); the
    file, and the authors' pipeline (stock loader) with its stock sampler config."""
    pipe = load_pipeline("sd15")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    state = random_lora(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=targets), seed=2, std=std)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    kohya = {k: (torch.tensor(8.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    file = tmp_path / f"tdm_dreamshaper{suffix}"
    if suffix == ".pt":
        torch.save(kohya, file)
    else:
        from safetensors.torch import save_file

        save_file(kohya, file)
    authors = load_pipeline("sd15")
    authors.load_lora_weights(dict(kohya))
    return file, authors, dict(authors.scheduler.config, _class_name="DPMSolverMultistepScheduler", timestep_spacing="linspace")


@pytest.mark.parametrize("suffix, std", [(".pt", 0.1), (".safetensors", 0.3)])
def test_kohya_sd15(suffix, std, tmp_path):
    file, authors, stock = kohya_release(tmp_path, suffix, std)
    out = convert_checkpoint(file, shipped_pipeline("sd15"), tmp_path / "student", "tdm-dreamshaper")
    assert_reproduced(authors, stock, out, "sd15", f"TDM-Dreamshaper (kohya {suffix}, LoRA std {std})")
    scheduler = TDMScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 500, 250]


def test_cogvideox_style_ddim_zero_snr(tmp_path):
    """TDM-CogVideoX-2B's sampler (CogVideoXDDIMScheduler, v-prediction, zero SNR, SNR shift 3, trailing) and
    stock-loader LoRA, on the tiny SD1.5 UNet (a tiny CogVideoX pipeline is not shipped)."""
    base = tmp_path / "base"
    shutil.copytree(shipped_pipeline("sd15"), base)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(COGVIDEOX_DDIM))
    pipe = load_pipeline(base)
    state = random_lora(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), seed=3)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=state)
    recipe = Recipe("TDM-CogVideoX-2B-LoRA (sampler and format, on a UNet)", "sd15", "diffusers", lambda config: dict(config))
    out = convert_checkpoint(tmp_path / "lora" / "pytorch_lora_weights.safetensors", base, tmp_path / "student", recipe)
    authors = load_pipeline(base)
    authors.load_lora_weights(str(tmp_path / "lora"))
    assert_reproduced(authors, COGVIDEOX_DDIM, out, base, "CogVideoX-style DDIM (diffusers LoRA)")


def ema_wrapper() -> LoraConfig:
    return LoraConfig(r=32, lora_alpha=64, target_modules=list(EMA_TARGETS), init_lora_weights=True)


@pytest.fixture(scope="module")
def ema_file(tmp_path_factory):
    """TDM-SD3.5 / TDM-R1's format: {"decay", "ema_parameters": [tensors in module order]}, no names."""
    pipe = load_pipeline("sd3")
    random_lora(pipe.transformer, ema_wrapper(), seed=4)
    params = [p.detach().clone() for p in pipe.transformer.parameters() if p.requires_grad]
    file = tmp_path_factory.mktemp("ema") / "tdm_sd35_ema.pt"
    torch.save({"decay": 0.999, "ema_parameters": params}, file)
    return file


def test_positional_ema_list(ema_file, tmp_path):
    out = convert_checkpoint(ema_file, shipped_pipeline("sd3"), tmp_path / "student", "tdm-sd35")
    authors = load_pipeline("sd3")
    authors.transformer.add_adapter(ema_wrapper())
    ema = torch.load(ema_file, weights_only=True)["ema_parameters"]
    trainable = [p for p in authors.transformer.parameters() if p.requires_grad]
    assert len(trainable) == len(ema)
    with torch.no_grad():
        for p, e in zip(trainable, ema):
            p.copy_(e)
    assert_reproduced(authors, dict(SANA_DPMSOLVER, flow_shift=3.0), out, "sd3", "TDM-SD3.5/R1 (positional EMA list)")


@pytest.mark.parametrize("release", ["tdm-dreamshaper", "tdm-sd3"])
def test_exported_graphs_follow_the_authors_sampler(release, sd3_lora, tmp_path):
    """`tdm-fast convert` -> `tdm-fast export --pipeline` (ONNX, CPU): each K's sampler graph, on the authors' latents and
    the pipeline's prompt embeddings, equals the authors' path within the export's fp32 tolerance (relative
    1e-4), and so do the torch-free runtime's images (prompt -> image, as in test_export_runtime)."""
    from tdm_fast.cli import main
    from tdm_fast.demos.t2i import IMAGE_SIZE, T5_LENGTH
    from tdm_fast.export.cli import relative_error
    from tdm_fast.export.runtime import OrtSampler, TextToImage
    from tdm_fast.export.text import pipeline_embeddings

    if release == "tdm-dreamshaper":
        kind, (file, authors, stock) = "sd15", kohya_release(tmp_path, ".safetensors", std=0.1)
    else:
        kind, file, stock = "sd3", sd3_lora, dict(SANA_DPMSOLVER, flow_shift=6.0)
        authors = load_pipeline("sd3")
        authors.load_lora_weights(str(sd3_lora.parent), adapter_name="tdm")
        authors.set_adapters(["tdm"], adapter_weights=[0.125])
    out, folder = tmp_path / "student", tmp_path / "onnx"
    length = ["--max-sequence-length", str(T5_LENGTH)] if kind == "sd3" else []  # the authors' prompts are padded to it
    assert main(["--quiet", "convert", "--checkpoint", str(file), "--base", str(shipped_pipeline(kind)), "--recipe", release,
                 *length, "--out", str(out)]) == 0
    assert main(["--quiet", "export", "--checkpoint", str(out), "--pipeline", str(shipped_pipeline(kind)), "--out", str(folder),
                 "--steps", *map(str, STEPS), "--device", "cpu", "--exporter", "torchscript"]) == 0
    cond = pipeline_embeddings(authors, kind, PROMPTS, T5_LENGTH)
    cond = cond if kind == "sd3" else cond["encoder_hidden_states"]
    extra = {"max_sequence_length": T5_LENGTH} if kind == "sd3" else {}
    runtime = TextToImage(folder)
    for steps in STEPS:
        expected = sample(authors, stock_scheduler(stock), steps)
        graph, scheduler = OrtSampler(folder / "sampler" / f"sampler_k{steps}_fp32.onnx"), TDMScheduler.from_pretrained(out, subfolder="scheduler")
        scheduler.set_timesteps(steps)
        assert graph.solver == scheduler.config.solver and graph.times == scheduler.timesteps.tolist()  # not the T' stage times
        error = relative_error(graph(LATENTS, cond), expected)
        with torch.no_grad():
            images = authors(prompt=PROMPTS, latents=LATENTS.clone(), num_inference_steps=steps, guidance_scale=1.0,
                             height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt", **extra).images.numpy()
        image_error = abs(runtime(PROMPTS, steps=steps, latents=LATENTS.numpy()).arrays - images).max()
        print(f"{release} ONNX K={steps}: sampler relative error {error:.2e}, runtime images max |diff| {image_error:.2e}")
        assert error <= 1e-4 and image_error <= 1e-3, (steps, error, image_error)


def test_distill_init_lora_continues_from_a_converted_release(tmp_path):
    """`distill --init-lora`: the student starts as the converted release (its rank, and its alpha holding the
    adapter scale), the fake score gets the run's own LoRA, and a run trains on from there."""
    from tdm_fast.backbones.run import PresetRun, build_preset_run
    from tdm_fast.cli import main
    from tdm_fast.conditions import expand_null
    from tdm_fast.config import TDMConfig
    from tdm_fast.demos.t2i import write_prompt_file
    from tdm_fast.denoiser import Denoiser
    from tdm_fast.lora import read_lora_folder, role_of

    file, _, _ = kohya_release(tmp_path, ".pt", std=0.1)
    base = shipped_pipeline("sd15")
    release = convert_checkpoint(file, base, tmp_path / "release", "tdm-dreamshaper", lora_scale=0.5)
    prompts = write_prompt_file(tmp_path / "prompts.txt")
    run = PresetRun(preset="sd15", model=base, prompts=prompts, embedding_cache=None, lora_rank=2, init_lora=release)
    _, student, fake, _, shape = build_preset_run(run, TDMConfig(steps=(4,)))
    converted = Denoiser.from_pretrained(release / "student")
    x, t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500])
    cond = expand_null(converted.null_cond, 2)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, cond), converted(x, t, cond), rtol=0, atol=0)
    configs = role_of(student).shared.lora_configs
    assert (configs["student"].r, configs["student"].lora_alpha) == (4, 8 * 0.5) and configs["fake"].r == 2

    out = tmp_path / "run"
    assert main(["--quiet", "distill", "--preset", "sd15", "--model", str(base), "--prompts", str(prompts), "--out", str(out),
                 "--iterations", "2", "--steps", "4", "--batch-size", "4", "--lora-rank", "2", "--embedding-cache", "none",
                 "--kernels", "reference", "--init-lora", str(release)]) == 0
    (config, trained), (_, initial) = read_lora_folder(out / "lora"), read_lora_folder(release)
    assert (config.r, config.lora_alpha) == (4, 4.0) and trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # trained on from the release


# -- bad input: one clear UsageError, nothing written ----------------------------------------------
class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def refused(file, tmp_path, recipe, match, base="sd3"):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=match):
        convert_checkpoint(file, shipped_pipeline(base) if base in ("sd3", "sd15") else base, out, recipe)
    assert not out.exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_truncated_and_misshapen_ema_lists_refused(ema_file, tmp_path):
    data = torch.load(ema_file, weights_only=True)
    torch.save({"decay": 0.999, "ema_parameters": data["ema_parameters"][:-2]}, tmp_path / "short.pt")
    refused(tmp_path / "short.pt", tmp_path, "tdm-sd35", "holds .* EMA tensors, but the peft wrapper")
    swapped = list(data["ema_parameters"])
    swapped[0], swapped[1] = swapped[1], swapped[0]  # lora_A (32, d) and lora_B (d, 32) of one layer
    torch.save({"decay": 0.999, "ema_parameters": swapped}, tmp_path / "swapped.pt")
    refused(tmp_path / "swapped.pt", tmp_path, "tdm-sd35", "EMA tensor 0 has shape")


def test_pickle_with_code_refused(tmp_path):
    torch.save({"decay": 0.999, "ema_parameters": [RunsCode()]}, tmp_path / "code.pt")
    refused(tmp_path / "code.pt", tmp_path, "tdm-sd35", "never unpickles")


def test_another_backbones_checkpoint_refused(sd3_lora, tmp_path):
    recipe = Recipe("an SD3 LoRA given for SD1.5", "sd15", "diffusers", lambda config: dict(config, _class_name="DDIMScheduler",
                                                                                          clip_sample=False, set_alpha_to_one=True))
    refused(sd3_lora, tmp_path, recipe, "name no layer of this sd15 base", base="sd15")
    refused(sd3_lora, tmp_path, "tdm-dreamshaper", "not kohya LoRA keys", base="sd15")


def test_kohya_unknown_keys_refused(tmp_path):
    torch.save({"lora_unet_down_blocks_9_attn_to_q.lora_down.weight": torch.zeros(4, 64),
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, tmp_path / "k.pt")
    refused(tmp_path / "k.pt", tmp_path, "tdm-dreamshaper", "2 of its keys are not kohya LoRA keys", base="sd15")

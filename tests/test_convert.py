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


def assert_reproduced(authors_pipe, stock_config: dict, out, base, label: str):
    for steps in STEPS:
        stock = getattr(__import__("diffusers"), stock_config["_class_name"]).from_config(
            {k: v for k, v in stock_config.items() if k != "_class_name"})
        expected = sample(authors_pipe, stock, steps)
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


@pytest.mark.parametrize("suffix, std", [(".pt", 0.1), (".safetensors", 0.3)])
def test_kohya_sd15(suffix, std, tmp_path):
    """TDM-Dreamshaper-v7's format: kohya names (lora_unet_*, lora_down/up, .alpha with alpha != rank)."""
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
    out = convert_checkpoint(file, shipped_pipeline("sd15"), tmp_path / "student", "tdm-dreamshaper")
    authors = load_pipeline("sd15")
    authors.load_lora_weights(dict(kohya))
    stock = dict(authors.scheduler.config, _class_name="DPMSolverMultistepScheduler", timestep_spacing="linspace")
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

"""Bring a TDM checkpoint: the official TDM releases as tdm-fast student folders (issue 34).

Each release is stored and sampled its own way (:data:`RECIPES`): a diffusers LoRA with an adapter scale
the README sets by hand (TDM-SD3-LoRA: 0.125), a kohya LoRA (TDM-Dreamshaper-v7: ``lora_unet_*``,
``lora_down``/``lora_up``, ``.alpha``), a stock-loader LoRA (TDM-CogVideoX-2B), or a positional, nameless EMA
list ``{"decay", "ema_parameters": [...]}`` that only fits a peft wrapper rebuilt exactly as the authors built
it (TDM-SD3.5, TDM-R1: r 32, α 64 on the attention projections, filled in module order). :func:`convert_checkpoint`
reads one, checks it against the base pipeline, and writes a folder laid out as a tdm-fast run's outputs:

    OUT/pytorch_lora_weights.safetensors   the LoRA in diffusers/peft naming, the adapter scale folded into alpha
    OUT/scheduler/                         TDMScheduler reproducing the authors' stock sampler (from_sampler_config)
    OUT/README.md                          model card: the release, the sampler, how to load
    OUT/student/                           the student Denoiser (``tdm-fast export --checkpoint OUT``)

Nothing is unpickled but tensors (``torch.load(weights_only=True)``); every problem with the input is a
:class:`~tdm_fast.usage.UsageError` raised before anything is written, and the folder is written beside its
place and renamed into it.
"""
from __future__ import annotations

import json
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .usage import UsageError

# Sana's DPM-Solver++(2M) scheduler config, which the official README loads for the SD3-family releases and
# then overrides flow_shift of
SANA_DPMSOLVER = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
    "flow_shift": 3.0, "lambda_min_clipped": float("-inf"), "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2,
    "solver_type": "midpoint", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None,
}
FORMATS = ("diffusers", "kohya", "ema_list")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
EMA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_KOHYA_SUFFIXES = {".lora_down.weight": "lora_A", ".lora_up.weight": "lora_B"}
_PEFT_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora.down.weight": "lora_A", ".lora.up.weight": "lora_B"}


def _sana(flow_shift: float) -> Callable[[dict], dict]:
    return lambda base: dict(SANA_DPMSOLVER, flow_shift=flow_shift)


def _dpmsolver_from_base(base: dict) -> dict:
    """``DPMSolverMultistepScheduler.from_pretrained(<SD1.5>, subfolder="scheduler")``: SD1.5's PNDM config
    names no spacing, so DPM-Solver's own (linspace) applies."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    return {"_class_name": "DPMSolverMultistepScheduler", **{k: base[k] for k in keep if k in base}, "timestep_spacing": "linspace"}


@dataclass(frozen=True)
class Recipe:
    """How one release is stored (``format``, ``lora_scale``, the EMA wrapper) and sampled (``sampler``: the
    stock scheduler config the authors sample with, from the base pipeline's scheduler config)."""

    release: str
    backbone: str  # the tdm_fast.backbones preset of its base
    format: str
    sampler: Callable[[dict], dict]
    lora_scale: float = 1.0
    ema_rank: int = 32
    ema_alpha: float = 64.0
    ema_targets: tuple[str, ...] = field(default=EMA_TARGETS)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")


RECIPES = {
    "tdm-sd3": Recipe("TDM-SD3-LoRA", "sd3", "diffusers", _sana(6.0), lora_scale=0.125),
    "tdm-dreamshaper": Recipe("TDM-Dreamshaper-v7-LoRA", "sd15", "kohya", _dpmsolver_from_base),
    "tdm-cogvideox": Recipe("TDM-CogVideoX-2B-LoRA", "cogvideox", "diffusers", lambda base: dict(base)),
    "tdm-sd35": Recipe("TDM-SD3.5-LoRA / TDM-R1", "sd3", "ema_list", _sana(3.0)),
}


def convert_checkpoint(checkpoint, base, out, recipe: str | Recipe, lora_scale: float | None = None,
                       max_sequence_length: int | None = None, variant: str | None = None) -> Path:
    """Reads ``checkpoint`` (a file of ``recipe``'s format) for the diffusers pipeline folder ``base`` and writes
    the student folder ``out`` (module docstring). ``lora_scale`` overrides the recipe's adapter scale.
    ``max_sequence_length``: the T5 tokens of the prompts it will be sampled with (SD3, CogVideoX; None: the
    pipeline's default, as the releases' READMEs sample), which fixes the empty-prompt condition the student
    keeps for export (``tdm-fast export --pipeline`` pads prompts to the same length). ``base`` is a local folder
    (a Hub model id: :func:`tdm_fast.hub.resolve_model` first); ``variant``: its weight files (e.g. ``fp16``)."""
    from .atomic import atomic_folder
    from .backbones.presets import get_preset, load_teacher, prompt_conditions, read_scheduler_config
    from .scheduler import TDMScheduler

    recipe = _recipe(recipe)
    scale = recipe.lora_scale if lora_scale is None else float(lora_scale)
    if not scale > 0:
        raise UsageError(f"the LoRA scale must be positive, got {scale}")
    checkpoint, base = checkpoint_file(checkpoint), Path(base)
    preset = get_preset(recipe.backbone)
    try:
        teacher, source = load_teacher(preset, base, variant=variant)
        stock = recipe.sampler(read_scheduler_config(base))
        scheduler = TDMScheduler.from_sampler_config(stock)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--base {base}: {_first_line(exc)}") from None
    student = _student(teacher, source, _read(checkpoint), recipe, scale, checkpoint)
    try:
        _, student.null_cond = prompt_conditions(preset, base, [""], teacher.model.inner, cache_dir=None, device="cpu",
                                                 max_sequence_length=max_sequence_length, variant=variant)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--base {base}: its text encoders cannot encode the empty prompt ({_first_line(exc)})") from None
    with atomic_folder(out) as tmp:
        from .publish import save_lora

        save_lora(student, tmp)
        scheduler.save_pretrained(tmp / "scheduler")
        student.save_pretrained(tmp / "student")
        _write_card(tmp, recipe, scale, stock, scheduler, base, checkpoint.name, preset.pipeline)
    return Path(out)


def checkpoint_file(path) -> Path:
    """``path`` itself, or the one weights file of a folder (a release's Hub repository as downloaded)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"{path} does not exist")
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise UsageError(f"{path} holds {len(files)} weight files ({', '.join(files) or f'none of {WEIGHT_SUFFIXES}'}): "
                         "give the checkpoint file itself")
    return path / files[0]


def _recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise UsageError(f"unknown release {recipe!r}; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[recipe]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _read(file: Path):
    """The file's tensors: safetensors, or a torch pickle of tensors/containers/numbers only."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except Exception as exc:  # safetensors raises its own error type on a damaged header
            raise UsageError(f"{file} is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(f"{file} holds objects other than tensors (code or classes), which tdm-fast never "
                         f"unpickles ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UsageError(f"{file} is not a readable torch checkpoint ({_first_line(exc)})") from None


def _student(teacher, source: dict, data, recipe: Recipe, scale: float, file: Path):
    """The student Denoiser: the base with the release's LoRA as the "student" role."""
    from .denoiser import Denoiser
    from .lora import LoRARole, SharedLoRABase

    inner = teacher.model.inner
    if recipe.format == "ema_list":
        config = _ema_config(recipe, scale)
        shared = SharedLoRABase(teacher.model, {"student": config}, source)
        _fill_positional(inner, data, recipe, file)
    else:
        if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
            raise UsageError(f"{file} is not a LoRA state dict (name -> tensor), as a {recipe.format} LoRA file is")
        weights, alphas = (_kohya_weights if recipe.format == "kohya" else _diffusers_weights)(data, inner, file, recipe)
        config = _lora_config(weights, alphas, scale)
        shared = SharedLoRABase(teacher.model, {"student": config}, source)
        _load_named(inner, weights, file)
    return Denoiser(LoRARole(shared, "student"), teacher.schedule, teacher.prediction_type).eval()


def _lora_layers(inner: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in inner.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _kohya_weights(state: dict, inner, file: Path, recipe: Recipe):
    """``lora_unet_<module with _>.lora_down/up.weight`` and ``.alpha`` -> peft keys and per-module alphas."""
    layers = {"lora_unet_" + name.replace(".", "_"): name for name in _lora_layers(inner)}

    def locate(key: str):
        stem, _, suffix = key.partition(".")
        return layers.get(stem), "alpha" if suffix == "alpha" else _KOHYA_SUFFIXES.get("." + suffix)

    return _collect(state, locate, file, f"are not kohya LoRA keys of this {recipe.backbone} base's {type(inner).__name__}",
                    "another backbone's LoRA, or not a kohya file")


def _diffusers_weights(state: dict, inner, file: Path, recipe: Recipe):
    """``<unet|transformer>.<module>.lora_A/B.weight`` (or the older ``lora.down/up``) -> peft keys; alpha is the
    rank (diffusers' default where the file names none) unless the file's own alphas say otherwise."""
    layers = _lora_layers(inner)

    def locate(key: str):
        name = key.split(".", 1)[1] if key.split(".", 1)[0] in ("unet", "transformer") else key
        suffix = next((s for s in (".alpha", *_PEFT_SUFFIXES) if name.endswith(s)), None)
        module = name[: -len(suffix)] if suffix else None
        return (module, "alpha" if suffix == ".alpha" else _PEFT_SUFFIXES[suffix]) if module in layers else (None, None)

    return _collect(state, locate, file, f"name no layer of this {recipe.backbone} base's {type(inner).__name__}",
                    "another backbone's LoRA, or not a diffusers LoRA")


def _collect(state: dict, locate, file: Path, unknown_means: str, likely: str):
    """peft keys and per-module alphas from ``locate(key) -> (module, "lora_A" | "lora_B" | "alpha")``
    ((None, None) for a key of no layer, which refuses the file)."""
    weights, alphas, unknown = {}, {}, []
    for key, value in state.items():
        module, part = locate(key)
        if module is None or part is None:
            unknown.append(key)
        elif part == "alpha":
            alphas[module] = float(value)
        else:
            weights[f"{module}.{part}.weight"] = value
    if unknown:
        raise UsageError(f"{file}: {len(unknown)} of its keys {unknown_means} (first: {unknown[0]}): {likely}")
    return weights, alphas


def _lora_config(weights: dict, alphas: dict, scale: float):
    """One LoraConfig for per-module ranks and alphas, the adapter scale folded into alpha (scaling = α/r)."""
    from peft import LoraConfig

    modules = sorted({key.rsplit(".", 2)[0] for key in weights})
    missing = [m for m in modules if f"{m}.lora_A.weight" not in weights or f"{m}.lora_B.weight" not in weights]
    if missing or not modules:
        raise UsageError(f"the LoRA {'has no layers' if not modules else f'lacks the down or up matrix of {missing[0]}'}")
    ranks = {m: int(weights[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    alpha = {m: alphas.get(m, ranks[m]) * scale for m in modules}
    rank, lora_alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alpha.values()).most_common(1)[0][0]
    return LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=modules, init_lora_weights=False,
                      rank_pattern={m: r for m, r in ranks.items() if r != rank},
                      alpha_pattern={m: a for m, a in alpha.items() if a != lora_alpha})


def _load_named(inner, weights: dict, file: Path) -> None:
    from .lora import fill_lora

    try:
        fill_lora(inner, weights, "student")
    except ValueError as exc:
        raise UsageError(f"{file}: {exc}") from None


def _ema_config(recipe: Recipe, scale: float):
    from peft import LoraConfig

    return LoraConfig(r=recipe.ema_rank, lora_alpha=recipe.ema_alpha * scale, target_modules=list(recipe.ema_targets),
                      init_lora_weights=True)


def _fill_positional(inner, data, recipe: Recipe, file: Path) -> None:
    """The authors' fill: the i-th tensor of ``ema_parameters`` into the i-th trainable LoRA parameter of the
    rebuilt wrapper, in module order; refused unless the count and every shape agree."""
    if not isinstance(data, dict) or not isinstance(data.get("ema_parameters"), (list, tuple)):
        raise UsageError(f"{file} is not a positional EMA list ({{\"decay\", \"ema_parameters\": [tensors]}})")
    tensors = list(data["ema_parameters"])
    params = [(n, p) for n, p in inner.named_parameters() if ".lora_A.student." in n or ".lora_B.student." in n]
    wrapper = f"the peft wrapper (r {recipe.ema_rank}, α {recipe.ema_alpha:g}, targets {', '.join(recipe.ema_targets)})"
    if len(tensors) != len(params):
        raise UsageError(f"{file} holds {len(tensors)} EMA tensors, but {wrapper} on this {recipe.backbone} base has "
                         f"{len(params)} LoRA parameters: a truncated list, or another model's")
    for i, ((name, param), tensor) in enumerate(zip(params, tensors)):
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != tuple(param.shape):
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise UsageError(f"{file}: EMA tensor {i} has shape {shape}, but {wrapper} expects {tuple(param.shape)} "
                             f"at {name}: another model's list, or another LoRA layout")
    with torch.no_grad():
        for (_, param), tensor in zip(params, tensors):
            param.copy_(tensor.to(param.dtype))


def _write_card(folder: Path, recipe: Recipe, scale: float, stock: dict, scheduler, base: Path, source_name: str,
                pipeline: str) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    from .publish import base_model_reference

    ref = base_model_reference(str(base))
    data = ModelCardData(base_model=None if ref["local"] else ref["model_id"], license=ref["license"] or "other",
                         library_name="diffusers", tags=["tdm", "distillation", "few-step", "lora", "diffusers"])
    scheduler.set_timesteps(4)
    sampler = {k: v for k, v in stock.items() if k in ("_class_name", "algorithm_type", "solver_order", "flow_shift",
                                                       "timestep_spacing", "prediction_type", "use_flow_sigmas")}
    text = f"""
# {recipe.release}, converted by tdm-fast

`{source_name}` ({recipe.format} format) of the official TDM release {recipe.release}, for the base
`{ref['name']}`. The LoRA is stored in diffusers/peft naming with the adapter scale {scale:g} folded into
its alpha: load it at scale 1.

`scheduler/` is a `TDMScheduler` that samples exactly as the authors' stock sampler
`{json.dumps(sampler)}` (guidance 1, deterministic); at 4 steps the model is given
timesteps {scheduler.timesteps.tolist()}.

```python
import diffusers
from tdm_fast import TDMScheduler

pipe = diffusers.{pipeline}.from_pretrained("{ref['name']}")
pipe.scheduler = TDMScheduler.from_pretrained("<this folder>", subfolder="scheduler")
pipe.load_lora_weights("<this folder>")
out = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=1.0)
```

`student/` is the same student as a tdm-fast denoiser folder (`tdm-fast export --checkpoint <this folder>`).
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(folder / "README.md")

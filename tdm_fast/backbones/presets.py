"""Presets: load a real teacher from a local diffusers pipeline folder and precompute its conditions.

A preset knows the backbone's pipeline class, the folder of its denoiser (``unet/`` or
``transformer/``), the adapter, the default resolution and how conditions are laid out. The
teacher's prediction type and noise schedule come from ``scheduler/scheduler_config.json``; the
unconditional condition is what the stock pipeline uses for CFG with no negative prompt (the
empty-prompt embedding; zeros for SDXL, whose pipelines set ``force_zeros_for_empty_prompt``).
Text embeddings are computed with the pipeline's own ``encode_prompt`` (so they equal what the
pipeline feeds its denoiser), cached to safetensors, and the text encoders are freed before training.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..denoiser import Denoiser
from ..schedule import ScheduleConfig
from ..prompts import cache_key, cached_embeddings, default_cache_dir
from .cogvideox import CogVideoXAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .validate import TEXT_COMPONENTS, check_pipeline_folder


@dataclass(frozen=True)
class Preset:
    name: str
    pipeline: str  # diffusers pipeline class name
    subfolder: str  # where the denoiser lives in the pipeline folder
    inner_class: str  # diffusers model class name
    adapter: type
    backbone: str  # key of the LoRA defaults in tdm_fast.lora
    resolution: int  # default pixel resolution
    cfg_scale: float  # default teacher guidance
    video: bool = False


PRESETS = {
    "sd15": Preset("sd15", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", UNetAdapter, "unet", 512, 4.5),
    "sdxl": Preset("sdxl", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", UNetAdapter, "unet", 1024, 6.0),
    "pixart": Preset("pixart", "PixArtAlphaPipeline", "transformer", "PixArtTransformer2DModel", PixArtAdapter, "pixart", 1024, 4.5),
    "sd3": Preset("sd3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", SD3Adapter, "sd3", 1024, 5.0),
    "cogvideox": Preset("cogvideox", "CogVideoXPipeline", "transformer", "CogVideoXTransformer3DModel", CogVideoXAdapter, "cogvideox", 480, 6.0, video=True),
}
VIDEO_SIZE = (480, 720)  # CogVideoX default (height, width)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def _pipeline_json(file: Path) -> dict:
    """A JSON object of a pipeline folder; errors name the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: --model must be a diffusers pipeline folder (or its Hub model id)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{file} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, not a {type(data).__name__}")
    return data


def _folder_pipeline(path: str | Path) -> str | None:
    """The pipeline class a folder's model_index.json names (None if it names none or cannot be read)."""
    try:
        data = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def read_scheduler_config(path: str | Path) -> dict:
    return _pipeline_json(Path(path) / "scheduler" / "scheduler_config.json")


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def prediction_type_of(scheduler_config: dict) -> str:
    name = str(scheduler_config.get("_class_name", ""))
    if "FlowMatch" in name:
        return "flow"
    return scheduler_config.get("prediction_type", "epsilon")


def vae_scale_factor(path: str | Path) -> int:
    file = Path(path) / "vae" / "config.json"
    if file.is_file():
        return 2 ** (len(json.loads(file.read_text())["block_out_channels"]) - 1)
    return 8


def load_teacher(preset: Preset | str, path: str | Path, torch_dtype=None, variant: str | None = None) -> tuple[Denoiser, dict]:
    """The teacher Denoiser (``null_cond`` still unset) and its base ``source`` (for LoRA save/reload).
    ``variant``: diffusers' weight variant (``fp16`` loads ``*.fp16.safetensors``), kept in ``source``."""
    import diffusers

    from ..hub import hub_origin

    preset = get_preset(preset) if isinstance(preset, str) else preset
    path = str(path)
    sched = read_scheduler_config(path)
    inner_cls = getattr(diffusers, preset.inner_class)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if variant:
        kwargs["variant"] = variant
    folder = Path(path) / preset.subfolder
    pipeline = _folder_pipeline(path)
    other = [p.name for p in PRESETS.values() if p.pipeline == pipeline and pipeline != preset.pipeline]
    if other:  # another backbone's folder: say so, rather than which file of this backbone it lacks
        raise ValueError(f"--model {path} is a {pipeline} folder ({'/'.join(other)}), not the {preset.pipeline} "
                         f"that --preset {preset.name} distils: pass --preset {other[0]}, or a {preset.pipeline} folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: a {preset.name} pipeline folder holds its {preset.inner_class} in {preset.subfolder}/")
    try:
        inner = inner_cls.from_pretrained(path, subfolder=preset.subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # missing, corrupt or mismatched weights/config
        raise ValueError(f"{folder}: cannot load the {preset.inner_class} ({_first_line(exc)})") from None
    if preset.adapter is SD3Adapter:
        adapter_kwargs = {"shift": float(sched.get("shift", 1.0)), "num_train_timesteps": int(sched.get("num_train_timesteps", 1000))}
    elif preset.adapter is PixArtAdapter:
        adapter_kwargs = {"vae_scale_factor": vae_scale_factor(path)}
    elif preset.adapter is CogVideoXAdapter:
        adapter_kwargs = {"vae_scale_factor_spatial": vae_scale_factor(path)}
    else:
        adapter_kwargs = {}
    adapter = preset.adapter(inner, **adapter_kwargs)
    teacher = Denoiser(adapter, ScheduleConfig.from_diffusers(sched), prediction_type_of(sched))
    source = {
        "preset": preset.name,  # for errors that name the backbone of a LoRA role's base
        "path": str(Path(path).resolve()),
        "subfolder": preset.subfolder,
        "adapter_class": f"{preset.adapter.__module__}:{preset.adapter.__qualname__}",
        "inner_class": f"{inner_cls.__module__}:{inner_cls.__qualname__}",
        "adapter_kwargs": adapter_kwargs,
    }
    if variant:
        source["variant"] = variant  # the base's weights reload in the same variant
    origin = hub_origin(Path(path).resolve())
    if origin:  # a Hub cache snapshot: the model id and commit it came from
        source["hub"] = origin
    return teacher, source


def native_resolution(preset: Preset | str, teacher_config, scale: int = 8) -> int | tuple[int, int]:
    """The pixel resolution the denoiser was built for: its latent ``sample_size`` (video:
    ``sample_height``/``sample_width``) times the VAE factor ``scale`` — SD1.5 64·8 = 512, SDXL and SD3
    128·8 = 1024, CogVideoX (60·8, 90·8) = (480, 720); the preset's default when the config has no size."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    get = teacher_config.get if hasattr(teacher_config, "get") else lambda k, d=None: getattr(teacher_config, k, d)
    if preset.video:
        h, w = get("sample_height", None), get("sample_width", None)
        return (int(h) * scale, int(w) * scale) if h and w else VIDEO_SIZE
    size = get("sample_size", None)
    if not size:
        return preset.resolution
    if isinstance(size, int):
        return size * scale
    h, w = size
    return int(h) * scale if h == w else (int(h) * scale, int(w) * scale)


def check_resolution(preset: Preset | str, teacher_config, resolution: int | tuple[int, int], scale: int = 8) -> None:
    """Refuses a pixel resolution that the VAE (``scale``) and then the denoiser (a UNet's downsamplings, a
    transformer's patches) cannot divide evenly: its latents would be cut short, or never come back to its size."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    get = teacher_config.get if hasattr(teacher_config, "get") else lambda k, d=None: getattr(teacher_config, k, d)
    blocks = get("block_out_channels", None)
    multiple = scale * (2 ** (len(blocks) - 1) if blocks else int(get("patch_size", None) or 1))
    sizes = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    bad = [size for size in sizes if size % multiple]
    if bad and not preset.video:
        lower = max(multiple, bad[0] // multiple * multiple)
        raise ValueError(f"--resolution {bad[0]}: this {preset.name} pipeline needs a multiple of {multiple} (its VAE "
                         f"divides by {scale}, its {preset.inner_class} by {multiple // scale}); use {lower} or {lower + multiple}")


def sample_shape(preset: Preset | str, teacher_config, resolution: int | tuple[int, int] | None = None, num_frames: int = 49,
                 scale: int = 8, temporal_compression: int = 4) -> tuple[int, ...]:
    """Latent shape of one sample: (C, H/8, W/8), or (F, C, H/8, W/8) for video."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if resolution is None:
        resolution = VIDEO_SIZE if preset.video else preset.resolution
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    channels = teacher_config.in_channels
    if preset.video:
        frames = (num_frames - 1) // temporal_compression + 1
        return (frames, channels, h // scale, w // scale)
    return (channels, h // scale, w // scale)


def missing_components(path: str | Path, pipeline_cls) -> dict:
    """``{name: None}`` for the pipeline components a folder does not have (e.g. SD3 without T5, no VAE)."""
    import inspect

    kwargs = {}
    index_file = Path(path) / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    for name in inspect.signature(pipeline_cls.__init__).parameters:
        entry = index.get(name)
        if name != "self" and name not in kwargs and isinstance(entry, list) and entry[0] is None:
            kwargs[name] = None  # components the folder does not have (e.g. SD3 without T5)
        elif name in ("image_encoder", "feature_extractor", "safety_checker") and name not in index:
            kwargs[name] = None
    return kwargs


def _pipeline_for_text(preset: Preset, path: str, denoiser_model, device, variant: str | None = None):
    import diffusers

    pipeline_cls = getattr(diffusers, preset.pipeline)
    kwargs = {"vae": None, preset.subfolder: denoiser_model}
    kwargs.update({k: v for k, v in missing_components(path, pipeline_cls).items() if k not in kwargs})
    if preset.name == "sd15":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    index_file = Path(path) / "model_index.json"
    index = _pipeline_json(index_file)
    for name, entry in index.items():  # the text encoders and tokenizers the prompts need
        if name.startswith(TEXT_COMPONENTS) and name not in kwargs and isinstance(entry, list) \
                and entry[0] is not None and not (Path(path) / name).is_dir():
            raise FileNotFoundError(f"{Path(path) / name} not found: {index_file} lists it, and the prompts need it "
                                    "(they are not in the embedding cache)")
    check_pipeline_folder(path, TEXT_COMPONENTS)  # what the encoders load, damaged: refused before the cache is written
    if variant:
        kwargs["variant"] = variant
    try:
        pipe = pipeline_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: cannot load the text encoders of the {preset.pipeline} ({_first_line(exc)})") from None
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.to(device)
    return pipe


@torch.no_grad()
def encode_prompts(preset: Preset | str, path: str | Path, prompts: list[str], denoiser_model, resolution=None,
                   device=None, batch: int = 16, max_sequence_length: int | None = None,
                   variant: str | None = None) -> dict[str, torch.Tensor]:
    """Conditions of all prompts and the null condition, as a flat dict of tensors (see :func:`split`);
    ``variant``: the text encoders' weight variant."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = str(path)
    pipe = _pipeline_for_text(preset, path, denoiser_model, device, variant)
    chunks: list[dict[str, torch.Tensor]] = []
    null: dict[str, torch.Tensor] = {}
    try:
        for start in range(0, len(prompts), batch):
            part = prompts[start:start + batch]
            cond, uncond = _encode(preset, pipe, part, device, resolution, max_sequence_length)
            chunks.append({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in cond.items()})
            if not null:
                null = {k: (v[0].float() if v.is_floating_point() else v[0]).cpu() for k, v in uncond.items()}
    finally:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = {f"cond.{k}": torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    out.update({f"null.{k}": v for k, v in null.items()})
    return out


def _encode(preset: Preset, pipe, prompts, device, resolution, max_sequence_length):
    n = len(prompts)
    msl = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if preset.name == "sd15":
        c, u = pipe.encode_prompt(prompts, device, 1, True)
        return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
    if preset.name == "sdxl":
        c, u, pc, pu = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        h, w = (resolution or preset.resolution,) * 2 if not isinstance(resolution, tuple) else resolution
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(n, 1)
        return (
            {"encoder_hidden_states": c, "text_embeds": pc, "time_ids": time_ids},
            {"encoder_hidden_states": u, "text_embeds": pu, "time_ids": time_ids},
        )
    if preset.name == "pixart":
        c, cm, u, um = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="", device=device, **msl)
        return (
            {"encoder_hidden_states": c, "encoder_attention_mask": cm.float()},
            {"encoder_hidden_states": u, "encoder_attention_mask": um.float()},
        )
    if preset.name == "sd3":
        c, u, pc, pu = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=True, **msl)
        return {"encoder_hidden_states": c, "pooled_projections": pc}, {"encoder_hidden_states": u, "pooled_projections": pu}
    if preset.name == "cogvideox":
        c, u = pipe.encode_prompt(prompts, negative_prompt=None, do_classifier_free_guidance=True, device=device, **msl)
        return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
    raise ValueError(preset.name)


def split(tensors: dict[str, torch.Tensor], preset: Preset | str):
    """(conditions, null_cond) from :func:`encode_prompts`' flat dict: a tensor for SD1.5 and
    CogVideoX (their adapters take the text embedding itself), dicts otherwise."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    cond = {k[len("cond."):]: v for k, v in tensors.items() if k.startswith("cond.")}
    null = {k[len("null."):]: v for k, v in tensors.items() if k.startswith("null.")}
    if preset.name in ("sd15", "cogvideox"):
        return cond["encoder_hidden_states"], null["encoder_hidden_states"]
    return cond, null


def text_files_fingerprint(path: str | Path) -> list:
    """(name, size, mtime) of every file of the folder's text encoders and tokenizers (and its
    model_index.json): part of the embedding cache key, so a folder whose text encoders were rebuilt or
    replaced in place gets fresh embeddings instead of the stale ones cached under the same path."""
    root = Path(path)
    entries = []
    for folder in sorted(root.glob("text_encoder*")) + sorted(root.glob("tokenizer*")) + [root / "model_index.json"]:
        for file in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
            if file.is_file():
                st = file.stat()
                entries.append([str(file.relative_to(root)), st.st_size, st.st_mtime_ns])
    return entries


def prompt_conditions(preset: Preset | str, path: str | Path, prompts: list[str], denoiser_model, resolution=None,
                      cache_dir: str | Path | None = "default", device=None, max_sequence_length: int | None = None,
                      variant: str | None = None):
    """Cached :func:`encode_prompts` + :func:`split`: returns (conditions, null_cond)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    preset = get_preset(preset) if isinstance(preset, str) else preset
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    # a variant joins the key only when given: the keys of the caches written before variants stay valid
    key = cache_key(model=str(Path(path).resolve()), preset=preset.name, prompts=prompts,
                    resolution=resolution, max_sequence_length=max_sequence_length, version=1,
                    text_files=text_files_fingerprint(path), **({"variant": variant} if variant else {}))
    # Under several processes the main one encodes (on its own device) and writes the cache first; the
    # others then read it. PartialState exists before the trainer's Accelerator and is the same state.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as AcceleratorState will read it
    with state.main_process_first():
        tensors = cached_embeddings(
            cache_dir, key,
            lambda: encode_prompts(preset, path, prompts, denoiser_model, resolution, device or state.device,
                                   max_sequence_length=max_sequence_length, variant=variant),
        )
    return split(tensors, preset)

"""What a finished run publishes: the student's LoRA in the diffusers (and kohya) format with its
K-embedding table, a complete pipeline folder of the fused student with :class:`~tdm_fast.scheduler.TDMScheduler`,
and the model card that says how to load either.

:func:`save_lora` writes the diffusers LoRA format (``pipeline.load_lora_weights``) and optionally the kohya
format; :func:`write_pipeline_folder` the fused folder; :func:`write_model_card` documents scheduler,
steps and guidance.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .hub import hub_origin
from .lora import PIPELINE_LORA, STEPS_EMBEDDING_FILE, role_of


def save_steps_embedding(student, path) -> None:
    if student.steps_embedding is None:
        return
    save_file(
        {"weight": student.steps_embedding.embedding.weight.detach().float().cpu().contiguous()},
        Path(path) / STEPS_EMBEDDING_FILE,
        metadata={"steps_set": json.dumps(list(student.steps_set)), "module": student.time_embedding.removeprefix("base.inner.")},
    )


def save_lora(student, path, kohya: bool = False) -> Path:
    """Writes the student's LoRA as ``pytorch_lora_weights.safetensors`` in the diffusers format.

    SD1.5/SDXL, SD3 and CogVideoX files load with ``pipeline.load_lora_weights(path)``; PixArt's with
    :func:`load_lora_adapter` (``load_lora_adapter(pipe.transformer, path)``). ``kohya=True`` also writes
    ``pytorch_lora_weights_kohya.safetensors`` (UNet models). A steps-aware student also writes its
    K-embedding table (``tdm_steps_embedding.safetensors``, see :func:`apply_steps_embedding`).
    """
    role = role_of(student)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in role.lora_state_dict().items()}
    pipeline_name, kwarg = PIPELINE_LORA.get(type(role.shared.adapter).__name__, (None, None))
    peft_config = role.shared.lora_configs[role.role]
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.to_dict().items()}
    if pipeline_name is None:
        save_file(state, path / "pytorch_lora_weights.safetensors",
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata, default=str)})
    else:
        import inspect

        import diffusers

        pipeline_cls = getattr(diffusers, pipeline_name)
        # peft's naming for every key, UNets included: convert_state_dict_to_diffusers renames only the
        # attention projections (to_q/k/v/out -> lora.down/up) and leaves every other target (convs,
        # feed-forward, proj_in/out) in peft's naming, and diffusers' loaders choose one naming for the
        # whole file from its first key, silently dropping the other half of a mixed file.
        layers = state
        kwargs = {kwarg: layers}
        meta_kwarg = kwarg.replace("_layers", "_adapter_metadata")
        if meta_kwarg in inspect.signature(pipeline_cls.save_lora_weights).parameters:
            kwargs[meta_kwarg] = metadata
        pipeline_cls.save_lora_weights(save_directory=str(path), **kwargs)
    if kohya:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

        prefixed = {f"unet.{k}": v for k, v in state.items()} if kwarg == "unet_lora_layers" else state
        kohya_state = convert_state_dict_to_kohya(prefixed)
        save_file({k: v.contiguous() for k, v in kohya_state.items()}, path / "pytorch_lora_weights_kohya.safetensors")
    save_steps_embedding(student, path)
    return path


# -- portable output folders -------------------------------------------------------------------
TDM_SCHEDULER_ENTRY = ["tdm_fast.scheduler", "TDMScheduler"]  # what diffusers' save_pretrained writes for it
_DUPLICATE_WEIGHTS = (".bin", ".msgpack", ".h5", ".ckpt", ".ot")  # other formats beside .safetensors
_ROOT_WEIGHTS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf")


def save_tdm_scheduler(folder, teacher_scheduler_config: dict, total_steps: int, solver: str = "ddim",
                       trained_steps: tuple[int, ...] | None = None):
    """Writes ``folder/scheduler/scheduler_config.json``: the :class:`~tdm_fast.TDMScheduler` built from
    the teacher pipeline's scheduler config with the run's ``total_steps`` (the training stage times),
    ``student_solver`` and ``trained_steps`` (the K set; other step counts warn), so
    ``TDMScheduler.from_pretrained(folder, subfolder="scheduler")`` samples as the student was trained."""
    from .scheduler import TDMScheduler

    trained = sorted(int(k) for k in trained_steps) if trained_steps else None
    scheduler = TDMScheduler.from_config(dict(teacher_scheduler_config), total_steps=int(total_steps), solver=solver,
                                         trained_steps=trained)
    scheduler.save_pretrained(Path(folder) / "scheduler")
    return scheduler


def _copy_component(src: Path, dst: Path) -> None:
    files = [f for f in src.rglob("*") if f.is_file()]
    has_safetensors = any(f.suffix == ".safetensors" for f in files)
    for f in files:
        name = f.name
        if has_safetensors and (f.suffix in _DUPLICATE_WEIGHTS or name.endswith(".bin.index.json")):
            continue  # diffusers and transformers load the .safetensors files
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)  # follows the symlinks of a Hugging Face cache snapshot


def write_pipeline_folder(folder, base, denoiser_name: str, denoiser: nn.Module, teacher_scheduler_config: dict,
                          total_steps: int, solver: str = "ddim", trained_steps: tuple[int, ...] | None = None) -> Path:
    """A complete diffusers pipeline folder: ``denoiser`` (a plain diffusers model) saved as the
    ``denoiser_name`` component, the TDMScheduler config as ``scheduler/`` (named
    ``["tdm_fast.scheduler", "TDMScheduler"]`` in ``model_index.json``), and every other component of
    the ``base`` pipeline folder (text encoders, tokenizers, VAE...) copied file by file; no model is
    loaded. Weights in other formats beside a component's ``.safetensors`` are not copied, nor the base's
    README.md and root-level weight files (single-file checkpoints); other root files (LICENSE) are.

    ``DiffusionPipeline.from_pretrained(folder)`` then loads it with the TDMScheduler set, once
    ``tdm_fast`` is imported (diffusers 0.42 resolves classes of other libraries from ``sys.modules`` only)."""
    folder, base = Path(folder), Path(base)
    index_file = base / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{index_file} not found: a fused pipeline folder needs the base's diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in index.items():
        if name.startswith("_") or name in (denoiser_name, "scheduler"):
            continue
        if isinstance(entry, list) and entry and entry[0] is not None and (base / name).is_dir():
            _copy_component(base / name, folder / name)
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name not in ("model_index.json", "README.md") and f.suffix not in _ROOT_WEIGHTS:
            shutil.copy2(f, folder / f.name)
    denoiser.save_pretrained(folder / denoiser_name)
    save_tdm_scheduler(folder, teacher_scheduler_config, total_steps, solver, trained_steps)
    index["scheduler"] = list(TDM_SCHEDULER_ENTRY)
    index.pop("_name_or_path", None)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def base_model_reference(base_model: str) -> dict:
    """How a model card names the base: ``{"name", "model_id", "local", "license"}``. A model id stays as
    it is; a local folder is named by its folder name (``local=True``) unless it is a Hugging Face cache
    snapshot, whose model id is known. ``license`` is read from a local base's own README.md metadata."""
    path = Path(str(base_model))
    if not path.exists():
        return {"name": str(base_model), "model_id": str(base_model), "local": False, "license": None}
    path = path.resolve()
    license = None
    readme = path / "README.md"
    if readme.is_file():
        try:
            from huggingface_hub import ModelCard

            license = ModelCard.load(readme).data.get("license")
        except Exception:  # a README without (valid) metadata
            license = None
    origin = hub_origin(path)
    model_id = origin["repo_id"] if origin else None
    return {"name": model_id or path.name, "model_id": model_id, "local": model_id is None, "license": license}


def write_model_card(path, *, base_model: str, backbone: str, pipeline: str, steps: tuple[int, ...], total_steps: int,
                     cfg_scale: float, lora: bool, prediction_type: str, folder_name: str | None = None,
                     license: str | None = None) -> Path:
    """README.md (``huggingface_hub.ModelCard``) stating exactly how to sample: TDMScheduler, K steps,
    guidance_scale=1. ``folder_name``: the name the folder will have for its users (``path`` may be a
    temporary one). ``base_model``: a model id or a local folder; the card holds no local path, only
    the model id or the local folder's name (and says it is local, leaving ``base_model`` out of the
    metadata, which the Hub reads as a model id). ``license``: default the base's, else ``other``."""
    from huggingface_hub import ModelCard, ModelCardData

    k = max(steps)
    name = folder_name or Path(path).name
    ref = base_model_reference(base_model)
    license = license or ref["license"] or "other"
    video = backbone == "cogvideox"
    denoiser = "unet" if backbone in ("sd15", "sdxl") else "transformer"
    tags = ["tdm", "distillation", "few-step", "text-to-video" if video else "text-to-image", "diffusers"] + (["lora"] if lora else [])
    data = ModelCardData(base_model=ref["model_id"], license=license, library_name="diffusers",
                         pipeline_tag="text-to-video" if video else "text-to-image", tags=tags)
    base_line = (f"Base model: local pipeline folder `{ref['name']}` (not a Hub model id; set `base_model` in this "
                 f"card's metadata to the base's model id before sharing)." if ref["local"] else f"Base model: `{ref['name']}`.")
    license_line = ("License: `other` (the base folder records none): the base model's license applies, check it before sharing."
                    if license == "other" and not ref["license"] else f"License: `{license}` (the base model's).")
    output = "frames" if video else "images"
    if lora:
        load = (f'pipe.load_lora_weights("{name}")' if backbone != "pixart"
                else f'from tdm_fast.lora import load_lora_adapter\nload_lora_adapter(pipe.transformer, "{name}")')
        code = f"""import torch, diffusers
from tdm_fast import TDMScheduler

pipe = diffusers.{pipeline}.from_pretrained("{ref['name']}")
pipe.scheduler = TDMScheduler.from_pretrained("{name}", subfolder="scheduler")  # = TDMScheduler.from_config(pipe.scheduler.config, total_steps={total_steps})
{load}
{output} = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=1.0).{output}"""
        what = f"LoRA of the {'/'.join(map(str, steps))}-step student (diffusers LoRA format) and its `scheduler/` (TDMScheduler)."
    else:
        code = f"""import torch, diffusers
import tdm_fast.scheduler  # diffusers loads model_index.json's ["tdm_fast.scheduler", "TDMScheduler"] only from an imported module

pipe = diffusers.DiffusionPipeline.from_pretrained("{name}")  # TDMScheduler already set
{output} = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=1.0).{output}"""
        what = ("A complete diffusers pipeline: the student's fused weights in place of the base's "
                f"`{denoiser}`, the base's other components, and `scheduler/` = TDMScheduler.")
    unify = ""
    if len(steps) > 1 and lora:
        unify = (
            "\nThis is a steps-aware student: after loading, fold the K embedding of the step count you sample with:\n\n"
            "```python\nfrom tdm_fast.lora import apply_steps_embedding\n"
            f"apply_steps_embedding(pipe.{denoiser}, \"{name}\", steps={k})\n```\n\n"
            "Calling it again with another K switches to that K's student; `pipe.unload_lora_weights()` (or "
            f"`tdm_fast.lora.remove_steps_embedding(pipe.{denoiser})`, which keeps the LoRA) restores the base exactly.\n"
        )
    elif len(steps) > 1:
        unify = f"\nThis steps-aware student's K embedding is folded in for K = {k}: sample with `num_inference_steps={k}`.\n"
    text = f"""
# TDM {'/'.join(map(str, steps))}-step student of {ref['name']}

{what}

Distilled with Trajectory Distribution Matching (tdm-fast). Teacher guidance (CFG) {cfg_scale} is
distilled into the weights: **sample with `guidance_scale=1` (no CFG)** and **`TDMScheduler`**
(deterministic DDIM jumps at t = T'-1, T'-1-T'/K, ...; T' = {total_steps}; teacher prediction
type `{prediction_type}`). Any other scheduler or timestep spacing gives wrong images.

Steps: {', '.join(map(str, steps))}.

{base_line}

{license_line}

```python
{code}
```
{unify}"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    card.save(path / "README.md")
    return path / "README.md"

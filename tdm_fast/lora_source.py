"""Where a LoRA student's base comes from: the base path as saved (portable: relative to the folder, or a Hub id),
its resolution when loading, the check that a folder holds the backbone the LoRA was trained on, and loading the
adapter's own network class (only from trusted modules).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .hub import looks_like_repo_id


def portable_base_path(base: str, folder) -> str:
    """What ``lora_role.json`` in ``folder`` stores for the base ``base``: an existing local folder as a
    POSIX path relative to ``folder`` (``os.path.relpath``), anything else (a model id) as given. Only
    where no relative path exists (another drive on Windows) does an absolute path remain."""
    local = Path(base)
    if not local.exists():
        return str(base)
    try:
        return Path(os.path.relpath(local.resolve(), Path(folder).resolve())).as_posix()
    except ValueError:
        return str(local.resolve())


def resolve_base_path(stored: str, config_file) -> tuple[str, bool]:
    """``(path or model id, is_model_id)`` of the base named by ``source.path`` of ``config_file``
    (a ``lora_role.json``): relative paths are taken from the file's folder; absolute ones (files of
    older versions) are used as they are."""
    config_file = Path(config_file)
    folder = config_file.parent
    local = Path(stored)
    expected = local if local.is_absolute() else folder / local
    if expected.exists():
        return str(expected.resolve()), False
    if not local.is_absolute() and looks_like_repo_id(stored):
        return stored, True  # a Hub model id (from_pretrained looks in the local cache, or downloads)
    shown = expected if local.is_absolute() else Path(os.path.normpath(expected))
    raise ValueError(
        f"{config_file}: the base pipeline folder of this LoRA role is not found at {shown} "
        f"(\"source.path\": {stored!r}{'' if local.is_absolute() else ', relative to the folder of this file'}); "
        "move the base folder and the run folder together so that this path holds again, or set \"source.path\" "
        "in this file to the base's folder (absolute, or relative to the folder of this file) or its Hub model id"
    )


def denoiser_name(source: dict) -> str:
    """``sd15 UNet2DConditionModel`` (the preset, where the source records it, and the model class)."""
    name = source["inner_class"].rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return f"{source['preset']} {name}" if source.get("preset") else name


def _class_name(file: Path) -> str | None:
    """The ``_class_name`` of a diffusers config or model_index.json (None if unreadable or absent)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def _describe_base(base: Path) -> str:
    """What a base folder holds, in the terms of :func:`denoiser_name` (for errors)."""
    from .backbones.presets import PRESETS

    pipeline = _class_name(base / "model_index.json")
    if pipeline is None:
        model = _class_name(base / "config.json")
        return f"a {model} folder" if model else "not a diffusers pipeline folder (no model_index.json)"
    presets = [p for p in PRESETS.values() if p.pipeline == pipeline]
    if not presets:
        return f"a {pipeline} folder"
    found = _class_name(base / presets[0].subfolder / "config.json") or presets[0].inner_class
    return f"a {pipeline} folder ({'/'.join(p.name for p in presets)} {found} in {presets[0].subfolder}/)"


def check_base_backbone(source: dict, config_file) -> None:
    """Refuses a local base folder whose denoiser is not the model class the LoRA was trained on (a LoRA
    role pointed at another backbone's pipeline), naming both, before ``from_pretrained`` fails on a
    missing file or peft on shapes."""
    base = Path(source["path"])
    folder = base / source["subfolder"] if source.get("subfolder") else base
    expected = source["inner_class"].rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    found = _class_name(folder / "config.json")
    if found == expected or (found is None and _class_name(base / "model_index.json") is None):
        return  # the right class, or a folder no diffusers config describes: from_pretrained judges it
    from .denoiser import WrongBaseError

    where = f" ({source['subfolder']}/)" if source.get("subfolder") else ""
    raise WrongBaseError(
        f"{config_file}: this LoRA was distilled on a {denoiser_name(source)}{where}, but its base \"source.path\" "
        f"{base} is {_describe_base(base)}; a LoRA loads only on its own backbone: set \"source.path\" in this file "
        "to the pipeline folder it was distilled from (absolute, or relative to the folder of this file)"
    )


def adapter_source(adapter, path: str, subfolder: str | None = None) -> dict:
    inner = type(adapter.inner)
    return {
        "path": path,
        "subfolder": subfolder,
        "adapter_class": f"{type(adapter).__module__}:{type(adapter).__qualname__}",
        "inner_class": f"{inner.__module__}:{inner.__qualname__}",
        "adapter_kwargs": adapter.adapter_kwargs(),
    }


def _import(qualified: str):
    from .denoiser import import_model_class

    return import_model_class(qualified)


def load_adapter(source: dict, **kwargs):
    """Rebuilds a backbone adapter from a :func:`adapter_source` dict (offline, from_pretrained)."""
    inner_cls = _import(source["inner_class"])
    if source.get("subfolder"):
        kwargs["subfolder"] = source["subfolder"]
    if source.get("variant"):  # the weight variant the base was loaded in (its folder may hold no other)
        kwargs.setdefault("variant", source["variant"])
    inner = inner_cls.from_pretrained(source["path"], **kwargs)
    return _import(source["adapter_class"])(inner, **source.get("adapter_kwargs", {}))


def remove_lora(model: nn.Module) -> nn.Module:
    """Replaces every peft LoRA layer of ``model`` by its base layer (after any merge)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "get_base_layer") and hasattr(child, "lora_A"):
                setattr(module, child_name, child.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return model

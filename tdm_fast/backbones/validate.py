"""Damaged diffusers pipeline folders, refused before anything is written.

The loaders accept too much: transformers builds a two-token tokenizer from a folder without tokenizer
files, loads integer weights, initialises a missing text-encoder tensor at random; diffusers leaves a missing
tensor on the meta device (a traceback at the first forward); NaN weights give NaN embeddings that are cached
and a student that is saved. :func:`check_pipeline_folder` reads each component's files the way the loaders
would (configs as JSON, safetensors headers, every tensor once through ``safe_open``, never a whole model in
memory) and raises ``ValueError`` naming the file and what to do.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# the safetensors dtypes of weights a diffusion run computes with (integers and bools are not weights)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# config keys the run reads itself (beyond what the loaders read), per component; an optional one such as the
# denoiser's sample_size (the preset's default resolution stands in) is not among them
READ_KEYS = {"vae": ("block_out_channels", "latent_channels"), "unet": ("in_channels",), "transformer": ("in_channels",)}
# tokenizer files transformers can build a real tokenizer from: any one of these sets
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("spiece.model",), ("vocab.txt",))
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# what only the prompts' encoding reads: a run whose embeddings are cached never loads them
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
FIX = "copy it again from the original pipeline"


def _json_object(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{file} is not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): {FIX}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, not a {type(data).__name__}: {FIX}")
    return data


def pipeline_index(path: str | Path) -> dict:
    """``model_index.json`` of a pipeline folder as a dict (an error names the file)."""
    file = Path(path) / "model_index.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: give a local diffusers pipeline folder")
    return _json_object(file)


def check_pipeline_folder(path: str | Path, components: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                          values_on_load: tuple[str, ...] = ()) -> None:
    """Refuses a damaged pipeline folder: an unreadable ``model_index.json``, and for each component whose name
    starts with one of ``components`` (None: every one the index lists) and not with one of ``skip`` (components
    the run will not load) that the folder holds, its damage (see :func:`check_component`). The tensor values of
    the components in ``values_on_load`` are left to :func:`check_loaded_weights` on the loaded model, so that
    their files are read once. A component missing altogether is left to the loaders, which say which run needs it."""
    if not (Path(path) / "model_index.json").is_file():
        return  # not a pipeline folder: the loaders name what it lacks
    index = pipeline_index(path)
    for name, entry in index.items():
        if (components is not None and not name.startswith(components)) or (skip and name.startswith(skip)):
            continue
        if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (Path(path) / name).is_dir():
            check_component(Path(path) / name, name, entry[0], entry[1], values=not name.startswith(values_on_load))


def check_component(folder: Path, name: str, library: str, class_name: str, values: bool = True) -> None:
    """One component folder: a scheduler's config, a tokenizer's files, or a model's config and weights (their
    values too unless ``values`` is False)."""
    if name.startswith("scheduler"):
        config = _json_object(folder / "scheduler_config.json")
        prediction = config.get("prediction_type")
        if "FlowMatch" not in str(config.get("_class_name", "")) and prediction is not None \
                and prediction not in PREDICTION_TYPES:
            raise ValueError(f"{folder / 'scheduler_config.json'}: prediction_type {prediction!r} is not one of "
                             f"{', '.join(PREDICTION_TYPES)}: set the one the model was trained with")
    elif name.startswith("tokenizer"):
        if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
            wanted = " or ".join(" and ".join(files) for files in TOKENIZER_FILES)
            raise ValueError(f"{folder} holds no tokenizer files ({wanted}); transformers would build a tokenizer "
                             f"that maps every prompt to the same ids: {FIX}")
        if (folder / "tokenizer.json").is_file():
            _json_object(folder / "tokenizer.json")
    elif library in ("diffusers", "transformers"):
        config = _json_object(folder / "config.json")
        missing = [key for key in READ_KEYS.get(name, ()) if key not in config]
        if missing:
            raise ValueError(f"{folder / 'config.json'} lacks {', '.join(map(repr, missing))}: {FIX}")
        cls = _model_class(library, class_name)
        # transformers loads a file saved with or without the base model's prefix (text_model. for CLIP)
        prefix = f"{cls.base_model_prefix}." if cls is not None and getattr(cls, "base_model_prefix", "") else None
        check_weights(folder, _expected_tensors(folder, cls, prefix), prefix, values=values)


def _weight_files(folder: Path) -> list[Path]:
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(_json_object(index).get("weight_map", {}).values()))
            return [folder / shard for shard in shards]
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    return []  # .bin weights or none: the loader's own message


def _model_class(library: str, class_name: str):
    """The diffusers or transformers model class a component names (None: not a model class)."""
    import importlib

    import torch

    cls = getattr(importlib.import_module(library), class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def _expected_tensors(folder: Path, cls, prefix: str | None) -> dict[tuple, tuple] | None:
    """``{names: shape}`` of the tensors ``cls`` built from the folder's config holds (on the meta device: no
    memory), tied names grouped as one, ``prefix`` dropped; None for a class this check cannot build."""
    import torch

    if cls is None:
        return None
    try:
        with torch.device("meta"):
            if hasattr(cls, "load_config"):  # diffusers
                model = cls.from_config(cls.load_config(folder))
            else:
                from transformers import AutoConfig

                model = cls(AutoConfig.from_pretrained(folder))
    except Exception:  # a config the class does not take: the loader reports it, naming the folder
        return None
    tensors: dict[int, list] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        tensors.setdefault(id(value), [tuple(value.shape)]).append(key)
    ignored = tuple(getattr(cls, "_keys_to_ignore_on_load_missing", None) or ())
    return {tuple(_unprefixed(key, prefix) for key in group[1:]): group[0] for group in tensors.values()
            if not any(re.search(pattern, key) for pattern in ignored for key in group[1:])}


def _unprefixed(key: str, prefix: str | None) -> str:
    return key.removeprefix(prefix) if prefix else key


def check_weights(folder: Path, expected: dict[tuple, tuple] | None, prefix: str | None = None, values: bool = True) -> None:
    """Every tensor of the component's safetensors files float and (with ``values``) finite; each ``expected``
    tensor (a group of tied names: one of them; names without ``prefix``) present with its shape. A file that
    holds none of them is named in a scheme the loader converts (an older transformers layout): only its
    values are checked. Without ``values`` only the headers are read (safetensors refuses a file cut short)."""
    from safetensors import safe_open

    files = _weight_files(folder)
    if not files:
        return
    shapes: dict[str, tuple] = {}
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except Exception as exc:  # safetensors' own error type on a damaged header
            raise ValueError(f"{file} is not a readable safetensors file ({exc}): {FIX}") from None
        with handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                dtype, shape = tensor_slice.get_dtype(), tuple(tensor_slice.get_shape())
                if dtype not in FLOAT_DTYPES:
                    raise ValueError(f"{file}: tensor {key} holds {dtype}, not floating-point weights: {FIX}")
                if values:
                    _check_finite(handle, key, file)
                shapes[_unprefixed(key, prefix)] = shape
    if expected and not any(n in shapes for names in expected for n in names):
        return
    for names, shape in (expected or {}).items():
        present = [n for n in names if n in shapes]
        if not present:
            raise ValueError(f"{files[0] if len(files) == 1 else folder} lacks the tensor {names[0]}: {FIX}")
        if shapes[present[0]] != shape:
            raise ValueError(f"{folder}: tensor {present[0]} has shape {list(shapes[present[0]])} but its config.json "
                             f"builds {list(shape)}: {FIX}")


def _check_finite(handle, key: str, file: Path) -> None:
    import torch

    try:
        finite = bool(torch.isfinite(handle.get_tensor(key)).all())
    except Exception as exc:  # a file cut short: its data ends before this tensor's
        raise ValueError(f"{file}: tensor {key} cannot be read ({exc}): {FIX}") from None
    if not finite:
        raise ValueError(f"{file}: tensor {key} holds NaN or inf: {FIX}, or retrain it")


def check_loaded_weights(model, folder: Path) -> None:
    """The values check of :func:`check_weights` on a model just loaded from ``folder`` (the files are not read
    a second time): every floating-point tensor finite."""
    import torch

    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{folder}: tensor {key} holds NaN or inf: {FIX}, or retrain it")


def check_vae_folder(path: str | Path) -> None:
    """A VAE folder (``config.json`` and weights) or a pipeline folder holding ``vae/``, as :func:`load_vae` reads it."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        check_pipeline_folder(path, ("vae",))
    elif (path / "config.json").is_file():
        check_component(path, "vae", "diffusers", str(_json_object(path / "config.json").get("_class_name", "AutoencoderKL")))

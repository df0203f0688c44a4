"""The manifest of a prompt → image export, and the metadata every exported graph carries; no torch.

``tdm-fast export --pipeline DIR`` leaves a folder that serves prompts without torch, laid out as
diffusers' and optimum's ONNX pipeline exports are (one folder per component, :data:`LAYOUT`):
``text_encoder/model.onnx`` (the prompt-encoder graph: every text encoder and the pipeline's
``encode_prompt`` assembly), ``sampler/sampler_k{K}_{dtype}.onnx`` (the whole K-step sampler of each K),
``vae_decoder/model.onnx``, ``tokenizer*/tokenizer.json``, ``scheduler/scheduler_config.json`` (the
:class:`~tdm_fast.TDMScheduler` whose times the sampler graphs bake in), ``model_index.json`` (the
runtime class and each component's loader) and ``manifest.json``, naming each file by its path relative
to the folder with its SHA-256, the tokenizers' lengths and padding, the sample and image shapes and,
as names only (provenance, never read back), the pipeline and checkpoint the graphs were exported from:
the folder can be moved or copied anywhere. Folders of manifest version 1 (every graph at the top level,
``prompt_encoder_{dtype}.onnx``...) load as they are: the manifest names every file either way.
:func:`load_manifest` refuses a folder whose manifest lists a file the folder lacks, lacks a graph the
runtime needs, or lists a file whose hash differs (a graph
copied in from another model, or edited after the export): serving would otherwise go on with
embeddings, latents or images of the wrong model and no error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tdm_fast.atomic import atomic_file

MANIFEST = "manifest.json"
MODEL_INDEX = "model_index.json"
FORMAT = "tdm-fast-text-to-image"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the flat layout of the first exports
# where each component goes in a version-2 folder (the sampler graphs: sampler_file)
LAYOUT = {"prompt_encoder": "text_encoder/model.onnx", "vae_decoder": "vae_decoder/model.onnx",
          "scheduler": "scheduler/scheduler_config.json"}
META_PREFIX = "tdm_fast."
REQUIRED_GRAPHS = ("prompt_encoder", "vae_decoder")


class ManifestError(ValueError):
    """An export folder that cannot serve prompts; the message says what is wrong and what to do."""


def decode_metadata(props: dict[str, str]) -> dict:
    """The ``tdm_fast.*`` entries of a graph's ``metadata_props`` (as ``onnx`` or ONNX Runtime's
    ``get_modelmeta().custom_metadata_map`` give them), JSON values decoded."""
    meta = {}
    for key, value in props.items():
        if key.startswith(META_PREFIX):
            try:
                meta[key[len(META_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                meta[key[len(META_PREFIX):]] = value
    return meta


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def sampler_key(steps: int) -> str:
    return f"sampler_k{steps}"


def sampler_file(steps: int, dtype: str) -> str:
    """The K-step sampler graph's path in a version-2 folder."""
    return f"sampler/{sampler_key(steps)}_{dtype}.onnx"


def write_model_index(folder: str | Path, tokenizers: list[str], version: str) -> Path:
    """``folder/model_index.json`` as diffusers writes it for a pipeline: the class that runs the folder, and
    per component folder the library and class that load it. Ours is :class:`~tdm_fast.export.runtime.TextToImage`:
    diffusers and optimum cannot run the folder, whose sampler is a whole K-step graph, not a per-step UNet."""
    index = {"_class_name": "TextToImage", "_module": "tdm_fast.export.runtime", "_tdm_fast_version": version,
             "text_encoder": ["onnxruntime", "InferenceSession"], "sampler": ["onnxruntime", "InferenceSession"],
             "vae_decoder": ["onnxruntime", "InferenceSession"], "scheduler": ["tdm_fast.scheduler", "TDMScheduler"],
             **{name: ["tokenizers", "Tokenizer"] for name in tokenizers}}
    path = Path(folder) / MODEL_INDEX
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return path


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Writes ``folder/manifest.json`` after hashing every graph and tokenizer file it lists."""
    folder = Path(folder)
    for section in ("graphs", "tokenizers"):
        for entry in manifest[section].values():
            entry["sha256"] = sha256_file(folder / entry["file"])
    path = folder / MANIFEST
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=2) + "\n")
    return path


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest of an export folder, checked: format, the graphs the runtime needs, every listed
    file present and (``verify``) hashing to what the export wrote. Raises :class:`ManifestError`."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST}: export the whole prompt-to-image path with "
                            "tdm-fast export --pipeline PIPELINE_DIR")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ManifestError(f"{path} is manifest version {manifest.get('version')}; this tdm-fast reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    graphs = manifest.get("graphs", {})
    missing = [name for name in REQUIRED_GRAPHS if name not in graphs]
    if not any(name.startswith("sampler_k") for name in graphs):
        missing.append("sampler_k*")
    if missing:
        raise ManifestError(f"{path} lists no {', '.join(missing)} graph: re-export the folder with tdm-fast export --pipeline")
    for section in ("graphs", "tokenizers"):
        for name, entry in manifest.get(section, {}).items():
            file = folder / entry["file"]
            if not file.is_file():
                raise ManifestError(f"{path} lists {name} as {entry['file']}, which {folder} does not have: "
                                    "re-export the folder with tdm-fast export --pipeline")
            if verify and sha256_file(file) != entry["sha256"]:
                raise ManifestError(
                    f"{file} is not the {name} this manifest was written for (SHA-256 differs): it was replaced after "
                    f"the export, e.g. by the file of another model than {manifest.get('model', {}).get('checkpoint', 'the exported one')}; "
                    "re-export the folder with tdm-fast export --pipeline")
    return manifest


def steps_of(manifest: dict) -> list[int]:
    """The K of every sampler graph in the manifest."""
    return sorted(entry["steps"] for name, entry in manifest["graphs"].items() if name.startswith("sampler_k"))

"""The manifest of a prompt → image export, and the metadata every exported graph carries; no torch.

``tdm-fast export --pipeline DIR`` leaves a folder that serves prompts without torch: the prompt-encoder
graph, the sampler graph of each K, the VAE decoder graph, the tokenizer files, and ``manifest.json``
naming each of them with its SHA-256, the tokenizers' lengths and padding, the sample and image shapes
and the model the graphs were exported from. :func:`load_manifest` refuses a folder whose manifest lists
a file the folder lacks, lacks a graph the runtime needs, or lists a file whose hash differs (a graph
copied in from another model, or edited after the export): serving would otherwise go on with
embeddings, latents or images of the wrong model and no error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tdm_fast.atomic import atomic_file

MANIFEST = "manifest.json"
FORMAT = "tdm-fast-text-to-image"
VERSION = 1
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
    if manifest.get("version") != VERSION:
        raise ManifestError(f"{path} is manifest version {manifest.get('version')}; this tdm-fast reads version {VERSION}")
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

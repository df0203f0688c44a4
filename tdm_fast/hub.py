"""Models named by a Hugging Face Hub id, and runs published to the Hub.

Every flag that takes a pipeline folder (``distill --model``, ``export --pipeline``/``--vae``, ``convert
--base``) also takes a Hub model id: :func:`resolve_model` turns it into the local snapshot folder that
diffusers' own ``from_pretrained`` would load, through the same resolution (``DiffusionPipeline.download``
for a pipeline: the files its components need, in the requested ``variant``; ``snapshot_download`` for a
VAE), so the on-disk cache, ``--revision``, ``--cache-dir`` and ``HF_HUB_OFFLINE=1`` behave as they do in
diffusers. The command line resolves once, before anything is written, and hands the library the folder.

:func:`check_push_to_hub` refuses an upload that cannot happen (offline, no token) before a run starts;
:func:`push_folder` uploads a finished folder.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from .usage import UsageError

# what the Hub accepts as a repository id: a name, or namespace/name
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_VAE_STEM = "diffusion_pytorch_model"


def looks_like_repo_id(value: str) -> bool:
    return bool(_REPO_ID.match(value)) and ".." not in value and not value.endswith((".", "-"))


def hub_origin(path: str | Path) -> dict | None:
    """``{"repo_id", "revision"}`` of a folder inside a Hugging Face cache snapshot
    (``.../models--org--name/snapshots/<commit>``), None for any other folder."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return {"repo_id": part[len("models--"):].replace("--", "/"), "revision": parts[i + 2]}
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _quiet_hub_logs():
    """diffusers and huggingface_hub log each offline fallback as a warning; the outcome is what we report."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _vae_patterns(variant: str | None) -> list[str]:
    """The files ``AutoencoderKL.from_pretrained`` reads from a VAE repository or a pipeline's ``vae/``."""
    if variant:
        weights = [f"{_VAE_STEM}.{variant}.safetensors", f"{_VAE_STEM}.{variant}-*.safetensors",
                   f"{_VAE_STEM}.safetensors.index.{variant}.json"]
    else:
        weights = [f"{_VAE_STEM}.safetensors", f"{_VAE_STEM}-*.safetensors", f"{_VAE_STEM}.safetensors.index.json"]
    return ["config.json", "model_index.json", *weights] + [f"vae/{p}" for p in ["config.json", *weights]]


def _download(repo_id: str, kind: str, revision: str | None, variant: str | None, cache_dir: str | None) -> str:
    with _quiet_hub_logs():
        if kind == "pipeline":
            from diffusers import DiffusionPipeline

            return str(DiffusionPipeline.download(repo_id, revision=revision, variant=variant, cache_dir=cache_dir))
        from huggingface_hub import snapshot_download

        return str(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_vae_patterns(variant)))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def resolve_model(value: str | Path, flag: str, *, kind: str = "pipeline", revision: str | None = None,
                  variant: str | None = None, cache_dir: str | Path | None = None) -> str:
    """The local folder ``flag``'s ``value`` names: an existing folder as is, else the Hub model id's cached
    (or downloaded) snapshot folder, whose path names the id and commit (:func:`hub_origin`). ``kind``:
    ``pipeline`` (a diffusers pipeline repository) or ``vae`` (a VAE repository, or a pipeline's ``vae/``). A
    value that is neither is one UsageError naming ``flag``, whether the Hub was asked, and what to do."""
    value = str(value)
    if Path(value).is_dir():
        given = [name for name, set_ in (("--revision", revision), ("--cache-dir", cache_dir)) if set_]
        if given:
            raise UsageError(f"{' and '.join(given)} {'selects' if len(given) == 1 else 'select'} a Hub model's "
                             f"snapshot, but {flag} {value} is a local folder: drop {given[0]}, or give a Hub model id")
        return value
    if not looks_like_repo_id(value):
        raise UsageError(f"{flag} {value} is not a folder, nor a Hub model id (org/name): give a local diffusers "
                         f"{kind} folder or a Hub model id")
    from huggingface_hub import constants

    where = f"{value}{f' at revision {revision}' if revision else ''}"
    try:
        return _download(value, kind, revision, variant, None if cache_dir is None else str(cache_dir))
    except (OSError, ValueError) as exc:  # not cached offline, unknown repo or revision, gated, no connection
        if _offline():
            raise UsageError(f"{flag} {value} is no local folder, and the Hub model {where} is not in the cache "
                             f"{cache_dir or constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1: the Hub was not asked); download "
                             "it once with network access, point --cache-dir at the cache that holds it, or give a local "
                             f"{kind} folder") from None
        raise UsageError(f"{flag} {value} is no local folder, and the Hub model {where} cannot be had "
                         f"({_first_line(exc)}); check the id and --revision, log in (hf auth login) for a gated or "
                         f"private model, or give a local {kind} folder") from None


def check_push_to_hub(repo_id: str, flag: str = "--push-to-hub") -> None:
    """Refuses an upload that cannot happen, before the run that would end in it starts."""
    if not looks_like_repo_id(repo_id):
        raise UsageError(f"{flag} {repo_id} is not a Hub repository id (name or org/name)")
    if _offline():
        raise UsageError(f"{flag} {repo_id}: HF_HUB_OFFLINE=1 allows no upload; unset it, or drop {flag} and upload "
                         "the folder later (hf upload REPO FOLDER)")
    from huggingface_hub import get_token

    if not get_token():
        raise UsageError(f"{flag} {repo_id}: no Hugging Face token; log in (hf auth login) or set HF_TOKEN, "
                         f"or drop {flag}")


def push_folder(folder: str | Path, repo_id: str, commit_message: str) -> str:
    """Uploads ``folder`` (its README.md is the repository's model card) to the model repository ``repo_id``,
    created if it does not exist; returns the commit's URL. A failure is a ValueError saying how to retry."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message)
    except Exception as exc:  # HTTP, connection and authorisation errors alike: the folder is kept either way
        raise ValueError(f"the upload of {folder} to the Hub repository {repo_id} failed ({_first_line(exc)}); the "
                         f"folder is complete: upload it with `hf upload {repo_id} {folder}`") from None
    return str(getattr(commit, "commit_url", commit))

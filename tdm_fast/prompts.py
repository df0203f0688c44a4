"""Prompt files and cached text embeddings.

Prompts come from a ``.txt`` file (one per line, blank lines and ``#`` comments skipped) or a
``.jsonl`` file (one object per line with a ``"prompt"`` field). Text embeddings are computed once
by the backbone's text encoders and cached as safetensors, keyed by a hash of everything that
determines them (model path, preset, prompts, resolution...), so the encoders can be deleted
before training and a rerun skips them entirely.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_file
from .usage import check_output_path


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # UTF-16, a binary file
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as UTF-8") from None
    prompts = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "prompt" field')
            prompts.append(record["prompt"])
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts")
    return prompts


def default_cache_dir() -> Path:
    return Path(os.environ.get("TDM_FAST_CACHE", Path.home() / ".cache" / "tdm-fast")) / "embeddings"


def cache_key(**parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_embeddings(cache_dir: str | Path | None, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Loads ``<cache_dir>/<key>.safetensors`` or computes, saves and returns ``compute()``.

    ``cache_dir=None`` disables the cache. The file is written atomically (:func:`tdm_fast.atomic.atomic_file`);
    a damaged entry is computed again. Non-finite embeddings (text encoder weights holding NaN or inf)
    are refused, not cached.
    """
    file = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if file is not None:
        # checked, not created: a run that compute() refuses (a damaged text encoder) leaves no cache folder behind
        check_output_path(cache_dir, "--embedding-cache")
        if file.is_file():
            try:
                return load_file(file)
            except Exception:  # safetensors' own error type on a damaged header: the entry is derived data, computed again
                pass
    tensors = compute()
    bad = [name for name, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the text encoders give non-finite embeddings ({', '.join(bad)}): their weights hold NaN or inf")
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(file) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    return tensors

"""Atomic, safetensors-only training checkpoints.

A checkpoint is a folder ``step-XXXXXXXX`` holding one safetensors file per group of tensors
(networks, optimizer moments, RNG states) and ``state.json`` with everything else. It is written
under a temporary name and renamed into place, so a killed run leaves either a complete checkpoint
or none.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, remove_stale_temporaries

STATE_FILE = "state.json"
PREFIX = "step-"
DIGEST_KEY = "state_sha256"  # in the metadata of each group's tensor file
RANK_PREFIX = "rank-"  # per-process files: written before state.json, they do not record its digest


class CheckpointError(RuntimeError):
    pass


def flatten(obj, tensors: dict, prefix: str = "t"):
    """Replace every tensor in a nested state by a reference into ``tensors``; JSON-able skeleton out."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten(v, tensors, prefix) for k, v in obj.items()}}
        return {"__items__": [[k, flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, tensors, prefix) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unflatten(skeleton, tensors: dict):
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"].items()}
        if "__items__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__items__"]}
        if "__list__" in skeleton:
            items = [unflatten(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton["tuple"] else items
    return skeleton


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


@contextlib.contextmanager
def _removed_on_failure(folder: Path):
    """A checkpoint being written that fails (a full disk, Ctrl-C, SIGTERM) is removed, not left half-written."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def write_rank_file(folder: Path, name: str, value: dict) -> None:
    """Per-process state (RNG streams) lives in its own file, its skeleton in the file's metadata."""
    tensors: dict = {}
    skeleton = flatten(value, tensors, prefix=name)
    with _removed_on_failure(folder):
        save_file(tensors, folder / f"{name}.safetensors", metadata={"skeleton": json.dumps(skeleton)})


def state_digest(skeleton: dict) -> str:
    """sha256 of ``state.json``'s content (not its formatting): each group's tensor file records it, so a
    ``state.json`` edited by hand (a step changed, a field removed) no longer matches the tensors beside it."""
    return hashlib.sha256(json.dumps(skeleton, sort_keys=True).encode()).hexdigest()


def write_state(folder: Path, state: dict) -> None:
    """One safetensors file per group, then ``state.json``: a folder with ``state.json`` is complete."""
    skeleton, group_tensors = {}, {}
    for group, value in state.items():
        group_tensors[group] = {}
        skeleton[group] = flatten(value, group_tensors[group], prefix=group)
    record = {DIGEST_KEY: state_digest(skeleton)}
    with _removed_on_failure(folder):
        # a group without tensors still gets its (empty) file: under FSDP every tensor lives in the rank
        # files, and some file must record the digest for an edited state.json to be caught
        for group, tensors in group_tensors.items():
            save_file(tensors, folder / f"{group}.safetensors", metadata=record)
        with open(folder / STATE_FILE, "w") as f:
            json.dump(skeleton, f)
            f.flush()
            os.fsync(f.fileno())


def commit_checkpoint(tmp: Path, final: Path, keep_last: int) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in checkpoint_dirs(final.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(path: Path) -> None:
    """Removes what killed :func:`replace_folder` calls left beside ``path`` (a previous folder parked
    between the two renames is put back if ``path`` is missing); also the names older versions used."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*-*"):
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temporaries(path)


def replace_folder(path: Path, write) -> None:
    """Runs ``write(tmp)`` on a fresh folder beside ``path``, then renames it to ``path``
    (:func:`tdm_fast.atomic.atomic_folder`): a kill, an exception or a full disk leaves the old complete
    folder or the new one, never a partly written ``path``."""
    with atomic_folder(path) as tmp:
        write(tmp)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete one inside a run or checkpoints folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = checkpoint_dirs(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found at {path}")


def read_skeleton(path: Path) -> dict:
    """``state.json`` of the checkpoint folder ``path``, refused (:class:`CheckpointError`) where it does not
    match the digest its tensor files recorded (checkpoints of older versions record none)."""
    from safetensors import safe_open

    try:
        skeleton = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is missing a file or corrupt: {exc}") from exc
    digest = state_digest(skeleton) if isinstance(skeleton, dict) else None
    for file in sorted(path.glob("*.safetensors")):
        if file.name.startswith(RANK_PREFIX):
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                recorded = (handle.metadata() or {}).get(DIGEST_KEY)
        except Exception as exc:  # safetensors' own error type on a damaged header
            raise CheckpointError(f"checkpoint {path} is corrupt: {file.name}: {exc}") from exc
        if recorded is not None and recorded != digest:
            raise CheckpointError(f"{path / STATE_FILE} does not match the tensors written with it ({file.name}): it was "
                                  "edited or replaced; restore it, or resume from another checkpoint")
    return skeleton


def read_meta(path: str | Path) -> dict:
    """The ``meta`` group (step, config, teacher fingerprint …) of a checkpoint, checked against its tensor files."""
    path = resolve_checkpoint(path)
    try:
        return unflatten(read_skeleton(path)["meta"], {})  # no tensors in meta
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE} lacks its meta record ({exc}): restore it, or resume from another "
                              "checkpoint") from None


def load_checkpoint(path: str | Path, rank_file: str | None = None) -> tuple[dict, dict | None]:
    """Reads a checkpoint; raises :class:`CheckpointError` naming the file when anything is missing or corrupt."""
    path = resolve_checkpoint(path)
    try:
        skeleton = read_skeleton(path)
        state = {}
        for group, value in skeleton.items():
            file = path / f"{group}.safetensors"
            state[group] = unflatten(value, load_file(file) if file.exists() else {})
        rank_state = None
        if rank_file is not None:
            from safetensors import safe_open

            file = path / f"{rank_file}.safetensors"
            with safe_open(file, framework="pt") as f:
                rank_skeleton = json.loads(f.metadata()["skeleton"])
            rank_state = unflatten(rank_skeleton, load_file(file))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is missing a file or corrupt: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type on a damaged header
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    return state, rank_state

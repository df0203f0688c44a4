"""What a checkpoint records of the teacher it was trained from, checked when a run resumes (issue 33).

A run resumed with other teacher weights would continue a student distilled from one model against
another: nothing fails, the result is silently wrong. So every checkpoint holds a fingerprint of the
teacher's weight files, and a resume with a teacher whose fingerprint differs is refused before the
teacher is loaded.

The fingerprint must be cheap for a 3.4 GB SD 1.5 UNet, whose files the load reads right after: a full
sha256 would read them a second time (~3 s of hashing alone at ~1 GB/s, plus the disk). It hashes instead
each safetensors file's name, size and header (every tensor's name, dtype, shape and offsets) and 256 bytes
from the middle of every tensor's data: a few KiB per file. Weights fine-tuned from the same model keep the
header but change the values of every trained tensor, so the sample differs.
"""
from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

SAMPLE_BYTES = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
KEY = "teacher_fingerprint"  # in a checkpoint's meta


def _safetensors_layout(handle, size: int) -> tuple[bytes, list[int]]:
    """A safetensors file's header and the offsets (from the file's start) of the middle of each tensor's
    data; (b"", []) when the header is unreadable (a damaged file: its loader names the damage)."""
    try:
        header_length = struct.unpack("<Q", handle.read(8))[0]
        if header_length > size - 8:
            return b"", []
        header = handle.read(header_length)
        spans = [entry["data_offsets"] for name, entry in json.loads(header).items() if name != "__metadata__"]
        return header, sorted(8 + header_length + (begin + end) // 2 for begin, end in spans)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        return b"", []


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over the weight files under ``folder`` (sorted by relative path): each one's name, size,
    safetensors header and a sample of every tensor's data (other formats: 64 evenly spaced samples)."""
    root = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()) if root.is_dir() else []
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as handle:
            header, offsets = _safetensors_layout(handle, size) if file.suffix == ".safetensors" else (b"", [])
            digest.update(header)
            for offset in offsets or range(0, size, max(size // 64, 1)):
                handle.seek(max(offset - SAMPLE_BYTES // 2, 0))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def check_teacher_fingerprint(meta: dict, fingerprint: str | None, checkpoint: str | Path) -> None:
    """Refuses (ValueError) a resume whose teacher is not the one the checkpoint was trained from; a checkpoint
    of an older version, which holds no fingerprint, resumes with a warning that this cannot be checked."""
    if fingerprint is None:
        return
    saved = meta.get(KEY)
    if saved is None:
        warnings.warn(f"checkpoint {checkpoint} was written by an older version and records no teacher fingerprint: "
                      "whether this teacher is the one it was trained from cannot be checked")
    elif saved != fingerprint:
        raise ValueError(f"checkpoint {checkpoint} was trained from another teacher (its weights differ from these): "
                         "resume it with the teacher it was trained from, or start a new run with another --out")

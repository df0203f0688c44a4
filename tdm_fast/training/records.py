"""The values one iteration records, as metrics.jsonl, trackers and the progress bar take them."""
from __future__ import annotations

import math


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def json_value(value):
    """Non-finite floats become null: ``metrics.jsonl`` stays strict JSON."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def tracker_config(config) -> dict:
    """The config as trackers accept it (scalars only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def short_loss(value) -> str:
    return "skipped" if value is None else f"{value:.4f}"

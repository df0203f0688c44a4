"""tdm-fast: Trajectory Distribution Matching, distilling diffusion models into 1-4 step students.

The public names import on first use (module ``__getattr__``), so that ``tdm_fast.export.runtime``,
which serves exported graphs with ONNX Runtime alone, can be imported where torch is not installed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ClassConditions": "trainer",
    "Denoiser": "denoiser",
    "EmbeddingConditions": "trainer",
    "NoiseSchedule": "schedule",
    "ScheduleConfig": "schedule",
    "TDMConfig": "config",
    "TDMScheduler": "scheduler",
    "TDMTrainer": "trainer",
    "ddim_sample": "sampling",
    "nfe_matched_baselines": "sampling",
    "sample_student": "sampling",
    "stage_times": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

"""Adapters that give a diffusers model the engine's ``model(x_t, t, cond)`` call.

An adapter is a thin ``nn.Module`` around the diffusers model (``self.inner``); it saves the inner
model with the model's own ``save_pretrained`` plus a small JSON naming the adapter, so that
``Denoiser.from_pretrained`` can rebuild it offline.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from torch import nn

ADAPTER_CONFIG = "adapter.json"


class DiffusersAdapter(nn.Module):
    """Base class: subclasses set ``inner_class`` and ``time_embedding_module`` and define ``forward``."""

    time_embedding_module: str = ""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def config(self):
        return self.inner.config

    def save_pretrained(self, path, **kwargs) -> None:
        path = Path(path)
        self.inner.save_pretrained(path, **kwargs)
        inner = type(self.inner)
        (path / ADAPTER_CONFIG).write_text(
            json.dumps({"inner_class": f"{inner.__module__}:{inner.__qualname__}"}, indent=2)
        )

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        path = Path(path)
        module_name, _, class_name = json.loads((path / ADAPTER_CONFIG).read_text())["inner_class"].partition(":")
        inner_cls = getattr(importlib.import_module(module_name), class_name)
        return cls(inner_cls.from_pretrained(path, **kwargs))

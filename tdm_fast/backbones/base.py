"""Adapters that give a diffusers model the engine's ``model(x_t, t, cond)`` call.

An adapter is a thin ``nn.Module`` around the diffusers model (``self.inner``); it saves the inner
model with the model's own ``save_pretrained`` plus a small JSON naming the adapter (and its few
settings, e.g. SD3's shift), so that ``Denoiser.from_pretrained`` can rebuild it offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

ADAPTER_CONFIG = "adapter.json"


class DiffusersAdapter(nn.Module):
    """Base class: subclasses set ``time_embedding_module`` and define ``forward``.

    ``time_embedding_module`` names (from the adapter) the submodule whose output is the timestep
    embedding of shape (B, D); the steps-aware student adds its K embedding there (spec §6).
    """

    time_embedding_module: str = ""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def config(self):
        return self.inner.config

    def adapter_kwargs(self) -> dict:
        """Settings besides the inner model that ``__init__`` takes (saved to ``adapter.json``)."""
        return {}

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        self.inner.enable_gradient_checkpointing(gradient_checkpointing_func)

    def save_pretrained(self, path, **kwargs) -> None:
        path = Path(path)
        self.inner.save_pretrained(path, **kwargs)
        inner = type(self.inner)
        meta = {"inner_class": f"{inner.__module__}:{inner.__qualname__}", "kwargs": self.adapter_kwargs()}
        (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from ..denoiser import import_model_class

        path = Path(path)
        meta = json.loads((path / ADAPTER_CONFIG).read_text())
        inner_cls = import_model_class(meta["inner_class"], source=path / ADAPTER_CONFIG)
        return cls(inner_cls.from_pretrained(path, **kwargs), **meta.get("kwargs", {}))

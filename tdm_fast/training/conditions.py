"""Condition samplers: ``conditions(batch, generator)`` draws a batch of conditions for one update."""
from __future__ import annotations

from typing import Callable

import torch

ConditionSampler = Callable[[int, torch.Generator], object]


class ClassConditions:
    """Uniform class labels 0..num_classes-1 (the null class is excluded)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (batch,), generator=generator)


class EmbeddingConditions:
    """Rows drawn uniformly from precomputed condition embeddings (a tensor or a dict of tensors)."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        first = next(iter(embeddings.values())) if isinstance(embeddings, dict) else embeddings
        self.count = first.shape[0]

    def __call__(self, batch: int, generator: torch.Generator):
        idx = torch.randint(0, self.count, (batch,), generator=generator)
        if isinstance(self.embeddings, dict):
            return {k: v[idx] for k, v in self.embeddings.items()}
        return self.embeddings[idx]

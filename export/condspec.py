"""How a condition (class labels, one text-embedding tensor, or a dict of them) is laid out as the
flat inputs of an exported graph. Without torch at import: the ONNX Runtime runners use it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CondSpec:
    """How a condition is laid out as flat graph inputs.

    ``kind`` is ``"labels"`` (int64 class labels, shape (B,)), ``"tensor"`` (e.g. text embeddings
    (B, L, C)) or ``"dict"`` (SDXL: ``encoder_hidden_states``, ``text_embeds``, ``time_ids``).
    ``names`` are the graph-input names in order.
    """

    kind: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, cond) -> "CondSpec":
        if isinstance(cond, dict):
            return cls("dict", tuple(cond))
        import torch  # only the export side calls this, with torch tensors

        cond = torch.as_tensor(cond)
        if not cond.dtype.is_floating_point:
            return cls("labels", ("class_labels",))
        return cls("tensor", ("encoder_hidden_states",))

    def flatten(self, cond) -> tuple:
        if self.kind == "dict":
            if not isinstance(cond, dict):
                raise TypeError(f"this sampler takes a dict condition with keys {list(self.names)}, got {type(cond).__name__}")
            missing = [k for k in self.names if k not in cond]
            if missing:
                raise ValueError(f"condition is missing {missing}; expected keys {list(self.names)}")
            return tuple(cond[k] for k in self.names)
        if isinstance(cond, dict):
            raise TypeError(f"this sampler takes a single condition tensor ({self.names[0]}), got a dict")
        return (cond,)

    def unflatten(self, tensors):
        if self.kind == "dict":
            return dict(zip(self.names, tensors))
        return tensors[0]

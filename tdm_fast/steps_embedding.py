"""A steps-aware student's K embedding in a stock diffusers model: folded into the bias of the time
embedding's last linear layer, switchable between the trained K and removable bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

STEPS_EMBEDDING_FILE = "tdm_steps_embedding.safetensors"
FOLDED_BASE_BIAS = "tdm_base_bias"  # buffer on the folded linear: its bias before any K embedding


def apply_steps_embedding(model: nn.Module, path, steps: int) -> None:
    """Sets the bias of the time embedding's last linear layer of a diffusers ``model`` (after
    ``load_lora_weights``) to its base bias plus the K embedding of a steps-aware student, so stock
    pipelines run the K-step student.

    Switchable and reversible: the base bias is remembered on the layer (a non-persistent buffer, so it
    follows ``.to()`` and stays out of ``state_dict``) the first time, and every call sets base + e_K, so
    calling it again with another K gives exactly that K's student. :func:`remove_steps_embedding`
    restores the base bias bit for bit, and so does the pipeline's ``unload_lora_weights()`` (diffusers
    calls the model's ``unload_lora()``, which this wraps on ``model`` until the embedding is removed)."""
    from safetensors import safe_open

    file = Path(path) / STEPS_EMBEDDING_FILE
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        weight = f.get_tensor("weight")
    steps_set = json.loads(meta["steps_set"])
    if steps not in steps_set:
        raise ValueError(f"this student was trained for K in {steps_set}, not {steps}")
    target = model.get_submodule(meta["module"])
    if getattr(target, "post_act", None) is not None:
        raise ValueError("cannot fold a steps embedding through a post-activation")
    layer = base_linears(target)[-1]
    with torch.no_grad():
        if FOLDED_BASE_BIAS not in layer._buffers:
            base = None if layer.bias is None else layer.bias.detach().clone()
            layer.register_buffer(FOLDED_BASE_BIAS, base, persistent=False)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device))
        base = layer._buffers[FOLDED_BASE_BIAS]
        vector = weight[steps_set.index(steps)].to(layer.bias)
        layer.bias.copy_(vector if base is None else base + vector)
    if hasattr(type(model), "unload_lora") and "unload_lora" not in model.__dict__:
        model.__dict__["unload_lora"] = UnloadWithStepsEmbedding(model)


def remove_steps_embedding(model: nn.Module) -> bool:
    """Gives the layer(s) folded by :func:`apply_steps_embedding` in ``model`` their base bias back, bit for
    bit (no bias again where the base had none). Returns whether there was one to remove."""
    removed = False
    for layer in model.modules():
        if FOLDED_BASE_BIAS in layer._buffers:
            base = layer._buffers.pop(FOLDED_BASE_BIAS)
            if base is None:
                layer.bias = None
            else:
                with torch.no_grad():
                    layer.bias.copy_(base)
            removed = True
    model.__dict__.pop("unload_lora", None)
    return removed


class UnloadWithStepsEmbedding:
    """``model.unload_lora`` while a K embedding is folded: the class's own unload, then the base bias
    back. An object, not a closure, so that a deep copy of the model unloads the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        result = type(self.model).unload_lora(self.model, *args, **kwargs)
        remove_steps_embedding(self.model)
        return result


def base_linears(module: nn.Module) -> list[nn.Linear]:
    """The nn.Linear layers of ``module`` in module order, a LoRA-wrapped layer counted by its base
    layer (never its ``lora_A``/``lora_B``, whose output is scaled by alpha/rank and dropped by a merge)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        base = module.get_base_layer()
        return [base] if isinstance(base, nn.Linear) else []
    if isinstance(module, nn.Linear):
        return [module]
    return [lin for child in module.children() for lin in base_linears(child)]


def fold_into_last_linear(module: nn.Module, vector: torch.Tensor) -> None:
    last = base_linears(module)[-1]
    if getattr(module, "post_act", None) is not None:
        raise ValueError("cannot fold a steps embedding through a post-activation")
    with torch.no_grad():
        if last.bias is None:
            last.bias = nn.Parameter(torch.zeros(last.out_features, dtype=last.weight.dtype, device=last.weight.device))
        last.bias.add_(vector.to(last.bias))

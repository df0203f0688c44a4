"""``torch.compile`` of the trainer's networks (``config.compile``)."""
from __future__ import annotations

import torch

# LoRA roles share one base whose peft layers switch adapters through attributes Dynamo guards on:
# each role x grad mode x block shape is its own compiled variant, more than Dynamo's default of 8.
COMPILE_RECOMPILE_LIMIT = 64
# Inductor's peak-memory reordering moves the scatter of a nearest-upsample backward (diffusers'
# Upsample2D) after the kernel that reads its zero-filled buffer, so every gradient through the
# upsampler comes out zero (torch 2.13, an Intel Xeon CPU; not reproduced on an AMD EPYC;
# tests/test_compile_iteration.py). The pass only lowers peak memory, so turning it off changes no number.
COMPILE_OPTIONS = {"reorder_for_peak_memory": False}


def compile_networks(trainer) -> list[torch.nn.Module]:
    """Compiles every distinct network under the trainer's teacher, student and fake score in place:
    with ``compile_scope="regional"`` diffusers' ``compile_repeated_blocks`` where the model declares
    repeated blocks (the compiled transformer block serves every instance, so compilation stays minutes,
    not tens of minutes), else, and with ``"full"``, ``module.compile()``: the whole network in one graph
    per role and grad mode, which also fuses the resnets and the LoRA layers outside the blocks: several
    times the compilation, faster iterations (``tdm-fast bench training``). The fused ops stay outside
    the compiled networks; they are custom operators, so a whole update compiled around them has no
    graph breaks (tests/test_custom_ops.py). Returns the networks compiled."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    networks = {}
    for denoiser in (trainer.teacher, trainer.student_core, trainer.fake_core):
        model = denoiser.model
        model = model.shared.adapter.inner if hasattr(model, "shared") else getattr(model, "inner", model)
        networks.setdefault(id(model), model)
    regional = trainer.config.compile_scope == "regional"
    for model in networks.values():
        if regional and getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
            model.compile_repeated_blocks(options=COMPILE_OPTIONS)
        else:
            model.compile(options=COMPILE_OPTIONS)
    return list(networks.values())

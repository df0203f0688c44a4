"""Fully sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Each network is sharded over all processes: every block class a diffusers model names in
``_no_split_modules`` becomes an FSDP unit, and the network the root unit. Full fine-tuning shards the
three :class:`~tdm_fast.denoiser.Denoiser` s (network and steps embedding) one by one. With LoRA roles
the unit is the shared base (frozen weights and every role's LoRA together): the teacher, student and
fake Denoisers all call it, each with its own adapter active; their steps embeddings (a few hundred
numbers) stay replicated and their gradients are all-reduced. Gradients are reduce-scattered by FSDP
itself, so the trainer does not wrap the networks in DDP; the optimizers are built on the sharded
(DTensor) parameters and fused AdamW still skips non-finite updates on the device.

Checkpoints are sharded: each process writes its own shards of the networks, the EMA and the
optimizer moments to its rank file, so a run resumes exactly on the same number of processes. The
student is gathered (``full_state_dict``) only to export it.

The settings come from accelerate's FSDP plugin (``accelerate launch --use_fsdp --fsdp_version 2``,
reshard-after-forward, CPU offload, mixed-precision policy). accelerate itself drops ``--use_fsdp``
on CPU-only machines (it picks plain multi-CPU data parallel); the trainer honours the flag there too,
which is also how the tests run FSDP over gloo.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


def plugin(accelerator: Accelerator):
    """accelerate's FSDP plugin of this run, or None when the run is not fully sharded."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.state.fsdp_plugin
    if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
    return None


def check_supported(settings, accelerator: Accelerator) -> None:
    """ValueError naming the alternative for what FSDP here does not do."""
    if settings.fsdp_version != 2:
        raise ValueError("FSDP1 is not supported: launch with --fsdp_version 2 (FSDP2, torch's fully_shard)")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("FSDP with fp16 is not supported (it needs a sharded grad scaler): use --mixed-precision bf16")


def unit(network: nn.Module) -> nn.Module:
    """The FSDP unit that holds ``network``'s weights: a LoRA role's shared base, else the network."""
    shared = getattr(getattr(network, "model", None), "shared", None)
    return shared.adapter if shared is not None else network


def shard_networks(networks, settings, device: torch.device, num_processes: int) -> None:
    """Shards the unit of every network once (a teacher role shares its unit with the student role),
    all over one device mesh of the processes."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (num_processes,))
    done = set()
    for network in networks:
        module = unit(network)
        if id(module) not in done:
            done.add(id(module))
            shard(module, settings, mesh)


def meta_template(network: nn.Module) -> nn.Module:
    """A copy of ``network`` (with its shared base, for a LoRA role) whose parameters are on the meta
    device (no memory), buffers real: what an unsharded export is loaded into (:func:`gather_into`)."""
    params = [*network.parameters(), *unit(network).parameters()]
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in params}
    memo.update({id(b): b.detach().clone() for m in (network, unit(network)) for b in m.buffers()})
    return copy.deepcopy(network, memo)


def all_reduce_replicated(params, accelerator: Accelerator) -> None:
    """Averages the gradients of the parameters FSDP does not manage (a LoRA role's steps embedding),
    as FSDP averages the sharded ones."""
    for p in params:
        if p.grad is not None and not is_sharded(p):
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def _block_classes(module: nn.Module) -> set[str]:
    return {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}


def shard(module: nn.Module, settings, mesh) -> None:
    """Shards ``module`` in place over ``mesh``: its diffusers blocks, then the module itself."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = settings.mixed_precision_policy
    offload = settings.cpu_offload
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": settings.reshard_after_forward,
        "mp_policy": policy if isinstance(policy, MixedPrecisionPolicy) else MixedPrecisionPolicy(),
        "offload_policy": offload if isinstance(offload, OffloadPolicy) else (CPUOffloadPolicy() if offload else OffloadPolicy()),
    }
    blocks = _block_classes(module)
    for child in reversed(list(module.modules())):  # innermost first: a unit must exist before its parent's
        if type(child).__name__ in blocks and child is not module:
            fully_shard(child, **kwargs)
    fully_shard(module, **kwargs)


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(value):
    """The process's own shard of a DTensor (anything else unchanged), recursively through dicts/lists."""
    if is_sharded(value):
        return value.to_local()
    if isinstance(value, dict):
        return {k: local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local(v) for v in value)
    return value


def load_shards(module: nn.Module, saved: dict) -> None:
    """Copies this process's saved shards (as :func:`local` wrote them) into ``module``'s weights."""
    current = module.state_dict()
    if current.keys() != saved.keys():
        raise ValueError(f"checkpoint shards do not match the network: {sorted(current.keys() ^ saved.keys())[:5]}")
    with torch.no_grad():
        for name, value in current.items():
            local(value).copy_(saved[name])


def optimizer_state_from_shards(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state dict with its moments turned back into DTensors shaped as the sharded
    parameters (a plain tensor would be cast, not sharded, by ``Optimizer.load_state_dict``)."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        p = params[int(index)]
        state[index] = {
            k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            if is_sharded(p) and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in values.items()
        }
    return {**saved, "state": state}


def gather_into(template: nn.Module, network: nn.Module, is_main: bool) -> nn.Module | None:
    """The full weights of the sharded ``network`` loaded into ``template`` (see :func:`meta_template`)
    on the main process; None elsewhere. Every process must call it (the gather is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(unit(network), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    unit(template).load_state_dict(full, assign=True)
    if unit(network) is not network:  # a role: its replicated weights (steps embedding) are its own
        replicated = {k: v.detach().cpu().clone() for k, v in network.state_dict().items() if not is_sharded(v)}
        template.load_state_dict(replicated, strict=False, assign=True)
    return template


@contextmanager
def no_gradient_sync(module: nn.Module):
    """A micro-batch whose gradients accumulate unsharded, reduce-scattered with the last one's."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)

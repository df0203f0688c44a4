"""The K-step student sampler as one ``nn.Module`` (loop unrolled, times and α/σ baked in), the
single-step denoiser module used for per-network export, condition flattening, LoRA fusion and
``torch.compile``.

Both modules call the wrapped network directly (``denoiser.model(x_t, t, cond)``) instead of
``Denoiser.forward``: the latter validates timesteps with host-side reads (``.any()``, ``.cpu()``)
that would break a traced or compiled graph. The arithmetic is the same as
:func:`tdm_fast.sampling.sample_student` (network in its own dtype, the jump in float32; DDIM or
DPM-Solver++(2M), :mod:`tdm_fast.solvers`). A converted release (``tdm-fast convert``) is sampled at the
times and σ of its folder's ``scheduler/`` instead (:func:`release_scheduler`), as its authors sample it.
"""
from __future__ import annotations

import copy
import json
import types
import weakref

import torch
from torch import nn

from tdm_fast.denoiser import Denoiser, StepsEmbedding
from tdm_fast.parameterization import to_x0_eps
from tdm_fast.sampling import sample_student, stage_times
from tdm_fast.solvers import correct, lambda_coefficients

from .condspec import CondSpec

# -- conditions -------------------------------------------------------------------------------


def cast_cond(cond, dtype: torch.dtype, device=None):
    """Cast the floating-point tensors of a condition to ``dtype`` (labels stay int64)."""
    if isinstance(cond, dict):
        return {k: cast_cond(v, dtype, device) for k, v in cond.items()}
    cond = torch.as_tensor(cond, device=device)
    if cond.dtype.is_floating_point:
        return cond.to(dtype=dtype, device=device)
    return cond.to(device=device, dtype=torch.long)


# -- LoRA fusion ------------------------------------------------------------------------------


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` carries LoRA: peft adapters, or a role of our shared LoRA base."""
    from tdm_fast.lora import LoRARole

    if isinstance(module, LoRARole):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def fuse_lora(module: nn.Module) -> nn.Module:
    """Merge every peft LoRA adapter into its base weights and drop the adapter layers.

    Works for a ``PeftModel`` (``merge_and_unload``) and for adapters injected into a plain or
    diffusers model (``add_adapter`` / ``inject_adapter_in_model``). Modifies ``module`` in place
    and returns the module to use (a ``PeftModel`` returns its unwrapped base model).
    """
    if hasattr(module, "merge_and_unload") and hasattr(module, "peft_config"):
        return module.merge_and_unload()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return module
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, BaseTunerLayer):
                sub.merge()
                setattr(child, attr, sub.get_base_layer())
    if hasattr(module, "peft_config"):
        try:
            del module.peft_config
        except AttributeError:
            pass
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False
    return module


def prepare_for_export(student: Denoiser, dtype: torch.dtype | None = None, device=None) -> Denoiser:
    """A deep copy of ``student`` in eval mode with LoRA fused, optionally cast to ``dtype``/``device``.

    A student trained with LoRA roles (:class:`tdm_fast.lora.LoRARole`, the real backbones) becomes
    a plain denoiser around a merged copy of the base (:func:`tdm_fast.lora.merged_denoiser`). The
    steps embedding's forward hook is re-registered on the copy (``copy.deepcopy`` keeps the hook
    bound to the original's embedding otherwise).
    """
    from tdm_fast.lora import LoRARole, merged_denoiser

    if isinstance(student.model, LoRARole):
        clone = merged_denoiser(student)
    else:
        clone = copy.deepcopy(student)
        if clone.steps_embedding is not None:
            hooks = clone.model.get_submodule(clone.time_embedding)._forward_hooks
            for handle, fn in list(hooks.items()):
                if isinstance(getattr(fn, "__self__", None), StepsEmbedding):
                    del hooks[handle]
        clone.model = fuse_lora(clone.model)
        if clone.steps_embedding is not None:
            clone.model.get_submodule(clone.time_embedding).register_forward_hook(clone.steps_embedding.hook)
    clone.eval().requires_grad_(False)
    if dtype is not None or device is not None:
        clone.to(device=device, dtype=dtype)
    return clone


# -- the modules ------------------------------------------------------------------------------


class _StepsMixin:
    def _set_steps(self, x: torch.Tensor):
        if self.steps_embedding is not None:
            # One constant index per sample, created from the (possibly symbolic) batch size.
            self.steps_embedding.current = x.new_full((x.shape[0],), self.steps_index, dtype=torch.long)

    def _init_steps(self, denoiser: Denoiser, steps: int | None):
        self.steps_embedding = denoiser.steps_embedding
        self.steps_index = -1
        if self.steps_embedding is not None:
            if steps is None:
                raise ValueError(f"this student is steps-aware (trained K {denoiser.steps_set}); pass steps")
            if steps not in self.steps_embedding.steps_set:
                raise ValueError(f"steps {steps} not in the trained set {self.steps_embedding.steps_set}")
            self.steps_index = self.steps_embedding.steps_set.index(steps)


class StudentSampler(_StepsMixin, nn.Module):
    """``forward(noise, cond) -> x̂0``: the deterministic K-step sampler of spec §2, unrolled.

    The stage times, their α, σ, where each step lands and the solver's coefficients are Python constants,
    so a traced graph contains K copies of the network and no loop. ``cond`` is a tensor or a dict of
    tensors, as for the student. ``solver``: ``ddim`` or ``dpmsolver`` (the previous stage's x̂0 is one
    more live tensor in the graph). ``scheduler``: a :class:`~tdm_fast.TDMScheduler` whose K-step run
    gives those constants instead (a converted release's: its solver, model timesteps — a flow model's
    σ·T — and landings, e.g. DDIM's t - T//K); ``total_steps`` and ``solver`` are then its own.
    """

    def __init__(self, student: Denoiser, steps: int, total_steps: int = 900, solver: str = "ddim", scheduler=None):
        super().__init__()
        self.net = student.model
        self.prediction_type = student.prediction_type
        self.steps = steps
        self.total_steps = total_steps
        if scheduler is None:
            self.solver = solver
            self.times = tuple(stage_times(steps, total_steps, student.schedule.num_train_timesteps, training=False))
            alphas, sigmas = student.schedule(torch.tensor(self.times), dtype=torch.float64)
            points = torch.stack([alphas, sigmas], 1)
            landings = torch.cat([points[1:], torch.tensor([[1.0, 0.0]], dtype=torch.float64)])
            self.time_dtype = torch.long
        else:
            scheduler.set_timesteps(steps)
            self.solver = scheduler.config.solver
            self.times = tuple(scheduler.plan.timesteps.tolist())
            points, landings = scheduler.plan.points, scheduler.plan.targets
            # a flow model is given the model time σ·T itself (which DPM-Solver's σ grid need not share with
            # any integer training time); a VP model its integer training time
            self.time_dtype = torch.float32 if scheduler.noise_schedule.is_flow else torch.long
        self.alphas = tuple(float(a) for a in points[:, 0])
        self.sigmas = tuple(float(s) for s in points[:, 1])
        self.landings = tuple((float(a), float(s)) for a, s in landings)
        self.coefficients = tuple(lambda_coefficients((points[:, 0].log() - points[:, 1].log()).tolist(), self.solver))
        self._init_steps(student, steps if student.steps_set else None)
        self.backbone = type(student.model).__name__
        inner = getattr(student.model, "inner", None)
        if inner is not None:
            self.backbone = f"{self.backbone}({type(inner).__name__})"

    def forward(self, noise: torch.Tensor, cond) -> torch.Tensor:
        x = noise
        dtype = noise.dtype
        x0_prev = noise  # c_0 = 0: the first step never reads x0_prev
        for i, t in enumerate(self.times):
            self._set_steps(x)
            t_vec = x.new_full((x.shape[0],), t, dtype=self.time_dtype)
            out = self.net(x, t_vec, cond)
            x0, eps = to_x0_eps(out.float(), x.float(), self.alphas[i], self.sigmas[i], self.prediction_type)
            alpha_next, sigma_next = self.landings[i]
            if sigma_next > 0:
                jump_x0, jump_eps = x0, eps
                if self.coefficients[i]:
                    jump_x0, jump_eps = correct(x0, eps, x0_prev, self.coefficients[i], self.alphas[i], self.sigmas[i])
                x = (alpha_next * jump_x0 + sigma_next * jump_eps).to(dtype)
            else:  # the last step's x̂0
                x = x0.to(dtype)
            x0_prev = x0
        return x


def release_scheduler(checkpoint):
    """The :class:`~tdm_fast.TDMScheduler` a converted release is sampled with: the ``scheduler/`` that
    ``tdm-fast convert`` writes beside ``student/`` (given the folder or its ``student/``), when it reproduces
    the authors' stock sampler; None for a student of ours, sampled at its stage times."""
    from pathlib import Path

    from tdm_fast.scheduler import TDMScheduler

    path = Path(checkpoint)
    for folder in (path, path.parent):
        if (folder / "scheduler" / "scheduler_config.json").is_file() and (folder / "student").is_dir():
            scheduler = TDMScheduler.from_pretrained(folder, subfolder="scheduler")
            return scheduler if scheduler.config.stock_scheduler else None
    return None


@torch.no_grad()
def sample_reference(student: Denoiser, noise, cond, steps: int, total_steps: int = 900, solver: str = "ddim", scheduler=None):
    """The eager torch sampler an exported graph is checked against: :func:`~tdm_fast.sampling.sample_student`,
    or with ``scheduler`` its own steps on the student's network, as a diffusers pipeline runs them at
    guidance 1 (for a converted release: its authors' stock scheduler arithmetic)."""
    if scheduler is None:
        return sample_student(student, noise, cond, steps, total_steps, solver=solver)
    scheduler.set_timesteps(steps)
    time_dtype = torch.float32 if scheduler.noise_schedule.is_flow else torch.long
    x = noise
    for t in scheduler.timesteps:
        out = student.model(x, t.to(x.device, time_dtype).expand(x.shape[0]), cond)
        x = scheduler.step(out, t, x).prev_sample
    return x


class DenoiserStep(_StepsMixin, nn.Module):
    """``forward(x_t, t, cond) -> (x0, eps)`` for one network evaluation at integer times ``t`` (B,).

    α_t, σ_t come from float32 tables inside the module (a Gather in ONNX), so one graph serves
    every timestep: this is the per-network export, used by many-step teacher samplers.
    """

    def __init__(self, denoiser: Denoiser, steps: int | None = None):
        super().__init__()
        self.net = denoiser.model
        self.prediction_type = denoiser.prediction_type
        self._init_steps(denoiser, steps if denoiser.steps_set else None)
        # On the network's device: the schedule lives on the CPU, t arrives where the network runs.
        device = _param_device(denoiser.model)
        self.register_buffer("alpha_table", denoiser.schedule.alphas.to(device, torch.float32, copy=True), persistent=False)
        self.register_buffer("sigma_table", denoiser.schedule.sigmas.to(device, torch.float32, copy=True), persistent=False)
        self.backbone = type(denoiser.model).__name__

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond):
        self._set_steps(x_t)
        t = t.long()
        out = self.net(x_t, t, cond)
        alpha, sigma = self.alpha_table[t], self.sigma_table[t]
        x0, eps = to_x0_eps(out.float(), x_t.float(), alpha, sigma, self.prediction_type)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)


class FlatInputs(nn.Module):
    """Adapts ``forward(*tensors)`` (what an exporter sees) to a module taking a condition pytree."""

    def __init__(self, inner: nn.Module, spec: CondSpec, leading: int):
        super().__init__()
        self.inner, self.spec, self.leading = inner, spec, leading

    def forward(self, *tensors):
        head, conds = tensors[: self.leading], tensors[self.leading :]
        return self.inner(*head, self.spec.unflatten(conds))


def ddim_loop(denoise, noise, cond, times, alphas_sigmas, cfg_scale: float = 1.0, null_cond=None):
    """Deterministic DDIM with CFG through ``times`` on any ``denoise(x, t_vec, cond) -> (x0, eps)``.

    Mirrors :func:`tdm_fast.sampling.ddim_sample` (cond and uncond batched in one call) for
    backends other than eager torch (a compiled :class:`DenoiserStep`, ONNX Runtime, TensorRT).
    ``alphas_sigmas(t) -> (α, σ)`` gives float32 scalars.
    """
    from tdm_fast.conditions import concat

    x = noise
    b = noise.shape[0]
    guided = cfg_scale != 1.0
    both = concat(cond, null_cond) if guided else cond
    for i, t in enumerate(times):
        xin = torch.cat([x, x]) if guided else x
        t_vec = torch.full((xin.shape[0],), t, dtype=torch.long, device=x.device)
        x0, eps = denoise(xin, t_vec, both)
        if guided:
            x0 = x0[b:] + cfg_scale * (x0[:b] - x0[b:])
            eps = eps[b:] + cfg_scale * (eps[:b] - eps[b:])
        if i + 1 < len(times):
            a, s = alphas_sigmas(times[i + 1])
            x = (a * x0.float() + s * eps.float()).to(noise.dtype)
    # A CUDA-graph step returns its static output buffer, which the next call overwrites.
    return x0.clone()


# -- torch.compile ----------------------------------------------------------------------------


class CompiledSampler:
    """A compiled :class:`StudentSampler`; call it as ``sampler(noise, cond) -> x̂0``.

    ``torch.compile`` keeps one graph per input shape (``dynamic=False``), so repeated calls
    with the same shapes reuse the compiled code. Outputs are cloned: with CUDA graphs the
    returned buffer is overwritten by the next replay.
    """

    def __init__(self, module: StudentSampler, compiled, channels_last: bool, clone_output: bool):
        self.module = module
        self.compiled = compiled
        self.channels_last = channels_last
        self.clone_output = clone_output
        self.steps = module.steps
        self.times = module.times

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, cond) -> torch.Tensor:
        if self.channels_last and noise.dim() == 4:
            noise = noise.contiguous(memory_format=torch.channels_last)
        out = self.compiled(noise, cond)
        return out.clone() if self.clone_output else out


_COMPILE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _own_forward(module: nn.Module):
    """``module.forward`` bound through a private copy of its code object.

    Dynamo keeps compiled graphs, and counts its recompile limit (8), per code object. Compiled
    through the shared ``StudentSampler.forward``, every (model, K) sampler of a process took one of
    the same 8 slots, and the 9th silently ran eagerly (seen in the latency suite: toy, digits and
    UNet at K = 1, 2, 4). A private code object gives each compiled module its own slots.
    """
    fn = type(module).forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, module)


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def compile_sampler(
    student: Denoiser,
    steps: int,
    total_steps: int = 900,
    mode: str | None = None,
    dynamic: bool = False,
    fullgraph: bool = False,
    channels_last: bool | None = None,
    backend: str = "inductor",
    fuse: bool = True,
    solver: str = "ddim",
    scheduler=None,
) -> CompiledSampler:
    """``torch.compile`` the unrolled K-step sampler of ``student``.

    Args:
        mode: ``None`` picks ``"max-autotune"`` on CUDA (autotuned kernels and CUDA graphs) and
            the default inductor mode on CPU; pass ``"reduce-overhead"`` for CUDA graphs without
            autotuning.
        dynamic: ``False`` compiles per input shape (cached by torch.compile); ``True`` marks
            shapes dynamic (one graph for all batch sizes, somewhat slower kernels).
        channels_last: convert 4-D inputs and the network's weights to channels-last; default on
            CUDA only (it helps convolutions with cuDNN/Triton, not the CPU inductor path).
        fuse: fuse LoRA adapters into the weights first (on a copy; the student is not modified).
        solver: ``ddim`` or ``dpmsolver``, as for :func:`tdm_fast.sampling.sample_student`.
        scheduler: a converted release's :class:`~tdm_fast.TDMScheduler` (:class:`StudentSampler`).

    Calls with the same student and settings return the same :class:`CompiledSampler`.
    """
    plan = None if scheduler is None else json.dumps(scheduler.config, sort_keys=True, default=str)
    key = (steps, total_steps, mode, dynamic, fullgraph, channels_last, backend, fuse, solver, plan)
    per_student = _COMPILE_CACHE.setdefault(student, {})
    if key in per_student:
        return per_student[key]
    device = _param_device(student)
    if mode is None and device.type == "cuda":
        mode = "max-autotune"
    if channels_last is None:
        channels_last = device.type == "cuda"
    model = prepare_for_export(student) if fuse and has_lora(student.model) else student
    module = StudentSampler(model, steps, total_steps, solver, scheduler).eval()
    if channels_last:
        module.net.to(memory_format=torch.channels_last)
    compiled = torch.compile(_own_forward(module), mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
    uses_cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    sampler = CompiledSampler(module, compiled, channels_last, clone_output=uses_cudagraphs)
    per_student[key] = sampler
    return sampler


def compile_denoiser_step(denoiser: Denoiser, steps: int | None = None, mode: str | None = None, dynamic: bool = False):
    """``torch.compile`` one network evaluation (:class:`DenoiserStep`); used for many-step teachers.

    ``t`` is a tensor input, so the 50 steps of a teacher share one compiled graph.
    """
    device = _param_device(denoiser)
    if mode is None and device.type == "cuda":
        mode = "max-autotune"
    module = DenoiserStep(denoiser, steps).eval()
    return torch.compile(_own_forward(module), mode=mode, dynamic=dynamic)

"""LoRA training with one set of base weights: teacher, student and fake score share a backbone.

The student and the fake score are two peft LoRA adapters ("student", "fake") injected into the
same diffusers model; the teacher is that model with its adapters disabled. Each of the trainer's
three :class:`~tdm_fast.denoiser.Denoiser` s wraps a :class:`LoRARole`, which activates its role's
adapter for the duration of its call (setting the peft layers' active adapter directly, so that
``requires_grad`` of the other role is never touched) and registers only its own LoRA weights as
parameters: the trainer's optimizers, gradient clipping, DDP and checkpoints see exactly one role.

The steps embedding of a steps-aware ("unify") student and fake sits on the shared timestep
embedding module; its forward hook only fires while its own role is active. Gradient
checkpointing recomputes a block in the backward pass, after other roles may have run: the
checkpoint function installed by :meth:`SharedLoRABase.enable_gradient_checkpointing` re-activates
the role that ran the block's forward.

:func:`fuse_student` merges the LoRA (and the K embedding) into a plain diffusers model;
:func:`apply_steps_embedding` folds a saved K embedding into a loaded one. Publishing (the diffusers LoRA
files, the fused pipeline folder, the model card) is :mod:`tdm_fast.publish`.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .lora_source import (adapter_source, check_base_backbone, denoiser_name, load_adapter, portable_base_path,
                          remove_lora, resolve_base_path)
# the K embedding's public names stay importable from here, where model cards and users import them
from .steps_embedding import (STEPS_EMBEDDING_FILE, apply_steps_embedding, fold_into_last_linear,  # noqa: F401
                              remove_steps_embedding)

LORA_ROLE_CONFIG = "lora_role.json"
ROLES = ("student", "fake")

# LoRA defaults per backbone: every linear/conv layer of the blocks, as diffusers' LCM-LoRA script does,
# except the timestep embedding's, which carries the folded K embedding. With the attention projections
# alone the measured students moved 3-4x slower at every K; rank 64 did no better than 16 at K = 4
# (docs/t2i_demo.md, rows sd15_lrB vs sd15_wideLR and sd15_C2 vs sd15_C0).
DEFAULT_TARGETS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
             "time_emb_proj", "conv_in", "conv_out"),
    "pixart": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"),
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
            "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_out"),
    "cogvideox": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm2.linear", "proj_out"),
}
DEFAULT_RANK = {"unet": 16, "pixart": 16, "sd3": 16, "cogvideox": 16}

# Where each adapter's LoRA goes in the diffusers pipeline format: (pipeline class, save kwarg).
PIPELINE_LORA = {
    "UNetAdapter": ("StableDiffusionPipeline", "unet_lora_layers"),
    "SD3Adapter": ("StableDiffusion3Pipeline", "transformer_lora_layers"),
    "CogVideoXAdapter": ("CogVideoXPipeline", "transformer_lora_layers"),
    "PixArtAdapter": (None, None),  # no pipeline LoRA loader: tdm_fast.lora.load_lora_adapter
}


@dataclass
class LoRASettings:
    """LoRA of student and fake score.

    ``fake="shared"`` puts the fake score's adapter on the student's base (one copy of the
    backbone in memory); ``fake="copy"`` gives the fake score its own base copy (more memory, but
    the two roles never share a forward pass).
    """

    rank: int = 32
    alpha: float | None = None  # None: alpha = rank (scale 1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0
    fake: str = "shared"
    fake_rank: int | None = None  # None: same as rank

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.fake not in ("shared", "copy"):
            raise ValueError(f"LoRA fake must be 'shared' or 'copy', got {self.fake!r}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @classmethod
    def for_backbone(cls, backbone: str, **overrides) -> "LoRASettings":
        kwargs = {"rank": DEFAULT_RANK.get(backbone, 16), "target_modules": DEFAULT_TARGETS.get(backbone, DEFAULT_TARGETS["unet"])}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def peft_config(self, rank: int | None = None):
        from peft import LoraConfig

        r = rank or self.rank
        alpha = self.alpha if self.alpha is not None else r
        return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(self.target_modules), lora_dropout=self.dropout, init_lora_weights=True)


def unmatched_lora_targets(model: nn.Module, targets) -> list[str]:
    """The LoRA targets that name no module of ``model`` by peft's rule (a module's full name, or its
    last dotted parts): peft wraps what the others match and silently ignores these."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def wrapped_modules(role: "LoRARole") -> int:
    """How many modules of its base ``role``'s LoRA wraps."""
    return sum(1 for layer in role.shared.layers if any(role.role in getattr(layer, n) for n in layer.adapter_layer_names))


def add_lora_adapters(model: nn.Module, configs: dict) -> None:
    """Injects one LoRA adapter per ``{name: LoraConfig}`` into ``model`` through one peft tuner, the way peft's
    ``PeftModel.add_adapter`` adds an adapter (``inject_adapter`` on the tuner that holds the first); a tuner per
    adapter, as diffusers' ``add_adapter`` makes, would find the previous one's ``peft_config`` on the model and
    warn. The model keeps the ``peft_config`` table that ``get_peft_model_state_dict`` reads, and a diffusers model
    (PeftAdapterMixin) is marked as carrying adapters, as its ``add_adapter`` marks it."""
    from peft.tuners.lora import LoraModel

    (first, first_config), *others = configs.items()
    for config in configs.values():
        config.base_model_name_or_path = None  # as diffusers' add_adapter: the base is the run's, not a hub id
    tuner = LoraModel(model, first_config, adapter_name=first)
    for name, config in others:
        tuner.peft_config[name] = config
        tuner.inject_adapter(model, name)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True


def load_lora_adapter(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Loads ``pytorch_lora_weights.safetensors`` written by :func:`save_lora` into a diffusers model
    without a LoRA loader (PixArt), using the LoRA config stored in the file's metadata."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    file = Path(path) / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = LoraConfig(**{k: v for k, v in meta.items() if k in LoraConfig.__dataclass_fields__})
    add_lora_adapters(model, {adapter_name: config})
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    return model


LORA_FILE = "pytorch_lora_weights.safetensors"
_PIPELINE_PREFIXES = ("unet.", "transformer.")  # diffusers' loaders' component prefixes


def read_lora_folder(folder):
    """``(LoraConfig, peft state dict)`` of a diffusers LoRA folder (``tdm-fast convert``'s output, or a run's
    ``lora/``), module names without the pipeline's component prefix. The config is the one stored in the
    file's adapter metadata (as diffusers writes and reads it; a converted release's alpha holds its adapter
    scale); a file without it gets each module's rank from its down matrix and alpha = rank, diffusers'
    default. A folder without the file, or a file of other keys, is a ValueError naming it."""
    from collections import Counter

    from peft import LoraConfig
    from safetensors import safe_open

    file = Path(folder) / LORA_FILE
    if not file.is_file():
        raise ValueError(f"{folder} holds no {LORA_FILE}: give a folder written by `tdm-fast convert`, or a run's lora/")
    try:
        with safe_open(str(file), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type on a damaged header
        raise ValueError(f"{file} is not a readable safetensors file ({' '.join(str(exc).split())})") from None

    def unprefixed(key: str) -> str:
        return key.split(".", 1)[1] if key.startswith(_PIPELINE_PREFIXES) else key

    weights = {unprefixed(k): v for k, v in state.items()}
    modules = sorted({k.rsplit(".", 2)[0] for k in weights})
    bad = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    bad += [f"{m}.lora_A.weight" for m in modules if f"{m}.lora_A.weight" not in weights]
    if bad or not modules:
        raise ValueError(f"{file} is not a LoRA in peft naming ({bad[0] if bad else 'no weights'}): a file of "
                         "`tdm-fast convert` or of a run's lora/ (another format: convert it first)")
    meta = {unprefixed(k): v for k, v in json.loads(raw).items()} if raw else {}
    if "r" in meta:
        return LoraConfig(**{k: v for k, v in meta.items() if k in LoraConfig.__dataclass_fields__}), weights
    ranks = {m: int(weights[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    patterns = {m: r for m, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, rank_pattern=patterns,
                      alpha_pattern=dict(patterns)), weights


def check_lora_fits(model: nn.Module, weights: dict) -> None:
    """Refuses (ValueError) a peft LoRA state dict with a weight of no layer of ``model`` or of another size:
    checked on the plain base, before adapters are built (and before a run writes anything)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for key, value in weights.items():
        name, part = key.rsplit(".", 2)[:2]
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"{key} has no place in this base's {type(model).__name__}: a LoRA of another backbone")
        size = layer.in_features if part == "lora_A" else layer.out_features  # Conv2d: channels, below
        if isinstance(layer, nn.Conv2d):
            size = layer.in_channels if part == "lora_A" else layer.out_channels
        if value.shape[1 if part == "lora_A" else 0] != size:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, which does not fit {name} ({type(layer).__name__} "
                             f"of {'input' if part == 'lora_A' else 'output'} size {size}): a LoRA of another model size")


def fill_lora(model: nn.Module, weights: dict, adapter_name: str) -> None:
    """Loads a peft LoRA state dict into ``model``'s adapter ``adapter_name``; a weight of another shape (a
    LoRA of another model size) or one with no place in that adapter's layers is a ValueError."""
    from peft.utils import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    except RuntimeError as exc:  # a shape mismatch: the module names exist but the sizes are another model's
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"its LoRA does not fit this base ({lines[-1] if lines else 'size mismatch'}): a LoRA of "
                         "another model size") from None
    unexpected = list(getattr(result, "unexpected_keys", ()))
    if unexpected:
        raise ValueError(f"{unexpected[0]} has no place in this base's LoRA layers")


def _tuner_layers(model: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class SharedLoRABase:
    """One diffusers adapter model (``tdm_fast.backbones``) carrying several LoRA adapters ("roles").

    Not an ``nn.Module``: the :class:`LoRARole` views decide what each Denoiser registers.
    ``source`` says how to reload the base offline (``{"path", "subfolder", "adapter_class",
    "inner_class", "adapter_kwargs"}``); without it a saved role also saves the base weights.
    """

    def __init__(self, adapter: nn.Module, lora_configs: dict, source: dict | None = None):
        self.adapter = adapter.requires_grad_(False).eval()
        self.source = source
        self.lora_configs = dict(lora_configs)
        inner = adapter.inner
        add_lora_adapters(inner, self.lora_configs)
        self.layers = _tuner_layers(inner)
        for role in self.lora_configs:  # peft trains only the active (first) adapter
            for p in self.role_modules(role).parameters():
                p.requires_grad_(True)
        self.active: str | None = "__unset__"
        self.activate(None)

    def role_modules(self, role: str) -> nn.ModuleList:
        modules = []
        for layer in self.layers:
            for name in layer.adapter_layer_names:
                table = getattr(layer, name)
                if role in table:
                    modules.append(table[role])
        return nn.ModuleList(modules)

    def activate(self, role: str | None) -> None:
        """Makes ``role``'s adapter the only active one; ``None`` disables all (the teacher)."""
        if role == self.active:
            return
        for layer in self.layers:
            if role is None:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = [role]
        self.active = role

    def enable_gradient_checkpointing(self) -> None:
        shared = self

        def checkpoint(module, *args):
            role = shared.active

            def run(*inputs):
                previous = shared.active
                shared.activate(role)
                try:
                    return module(*inputs)
                finally:
                    shared.activate(previous)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        self.adapter.enable_gradient_checkpointing(checkpoint)

    def cast_base(self, dtype: torch.dtype) -> None:
        """Stores the frozen base weights in ``dtype`` (bf16/fp16) and keeps LoRA weights in fp32."""
        lora = {id(p) for role in self.lora_configs for p in self.role_modules(role).parameters()}
        for p in self.adapter.parameters():
            if id(p) not in lora and p.is_floating_point():
                p.data = p.data.to(dtype)


class _RoleGatedTarget:
    """What :meth:`LoRARole.get_submodule` returns for the time embedding: hooks fire per role."""

    def __init__(self, module: nn.Module, role: "LoRARole"):
        self.module, self.role = module, role

    def modules(self):
        return self.module.modules()

    def register_forward_hook(self, hook, **kwargs):
        return self.module.register_forward_hook(_GatedHook(self.role.shared, self.role.role, hook), **kwargs)


class _GatedHook:
    """``hook`` while ``role`` is active on ``shared``. An object, not a closure, so that a deep copy of
    a role's Denoiser (with its shared base) gates on the copy's base, not on the original's."""

    def __init__(self, shared: "SharedLoRABase", role: str, hook):
        self.shared, self.role, self.hook = shared, role, hook

    def __call__(self, module, inputs, output):
        if self.shared.active == self.role:
            return self.hook(module, inputs, output)
        return None


class LoRARole(nn.Module):
    """``model(x_t, t, cond)`` of one role of a :class:`SharedLoRABase` (``role=None``: the teacher).

    Registers only its role's LoRA modules; ``.to(device)`` of the teacher role moves the base.
    """

    def __init__(self, shared: SharedLoRABase, role: str | None, owns_base: bool | None = None):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a registered submodule
        self.role = role
        self.owns_base = role is None if owns_base is None else owns_base
        self.lora = shared.role_modules(role) if role is not None else nn.ModuleList()
        self.time_embedding_module = "base." + shared.adapter.time_embedding_module

    def _apply(self, fn, *args, **kwargs):
        if self.owns_base:
            self.shared.adapter._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def get_submodule(self, target: str):
        if target.startswith("base."):
            module = self.shared.adapter.get_submodule(target[len("base."):])
            return _RoleGatedTarget(module, self)
        return super().get_submodule(target)

    @property
    def config(self):
        return self.shared.adapter.config

    def forward(self, x_t, t, cond):
        previous = self.shared.active
        self.shared.activate(self.role)
        try:
            return self.shared.adapter(x_t, t, cond)
        finally:
            self.shared.activate(previous)

    # -- serialization (so that Denoiser.save_pretrained / from_pretrained work) -------------
    def lora_state_dict(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.shared.adapter.inner, adapter_name=self.role)

    def save_pretrained(self, path, **kwargs) -> None:
        """Writes ``lora.safetensors`` and ``lora_role.json``. The JSON names the base by a path relative
        to ``path`` (or the model id it was loaded from), never an absolute path: the base pipeline folder
        and the run folder can be moved together."""
        if self.role is None:
            raise TypeError("the teacher role has no weights of its own; save the base model instead")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        adapter = self.shared.adapter
        source = self.shared.source
        if source is None:
            base = copy.deepcopy(adapter.inner)
            remove_lora(base)
            source = adapter_source(adapter, str(path / "base"))
            type(adapter)(base, **adapter.adapter_kwargs()).save_pretrained(path / "base")
            source["path"] = "base"  # relative to this folder
        else:
            source = dict(source, path=portable_base_path(source["path"], path))
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.lora_state_dict().items()}
        save_file(state, path / "lora.safetensors")
        config = self.shared.lora_configs[self.role].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        (path / LORA_ROLE_CONFIG).write_text(json.dumps({"source": source, "role": self.role, "lora": config}, indent=2, default=str))

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "LoRARole":
        """Loads a :meth:`save_pretrained` folder. ``source.path`` is resolved relative to the folder of
        ``lora_role.json`` (files of older versions with an absolute path still load); a base that cannot
        be found is a ValueError naming the file, the expected base path and how to fix it."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        path = Path(path)
        config_file = path / LORA_ROLE_CONFIG
        meta = json.loads(config_file.read_text())
        source = dict(meta["source"])
        source["path"], is_model_id = resolve_base_path(source["path"], config_file)
        if not is_model_id:
            check_base_backbone(source, config_file)
        try:
            adapter = load_adapter(source, **kwargs)
        except OSError as exc:
            if not is_model_id:
                raise
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise ValueError(
                f"{config_file}: the base model {source['path']!r} (a model id: no such folder beside this file) "
                f"cannot be loaded ({lines[0] if lines else type(exc).__name__}); download it, or set \"source.path\" "
                "in this file to the base pipeline folder (absolute, or relative to the folder of this file)"
            ) from None
        lora = {k: v for k, v in meta["lora"].items() if k in LoraConfig.__dataclass_fields__}
        shared = SharedLoRABase(adapter, {meta["role"]: LoraConfig(**lora)}, source)
        try:
            loaded = set_peft_model_state_dict(adapter.inner, load_file(path / "lora.safetensors"), adapter_name=meta["role"])
            unexpected = list(getattr(loaded, "unexpected_keys", ()))
        except RuntimeError as exc:  # a size mismatch
            found = re.search(r"size mismatch for ([\w.]+)", str(exc))
            unexpected = [f"size mismatch at {found.group(1)}" if found else str(exc).strip().splitlines()[0]]
        if unexpected:  # peft drops LoRA weights whose layer the base lacks: a silently different student
            from .denoiser import WrongBaseError

            raise WrongBaseError(
                f"{config_file}: the LoRA weights do not fit the base \"source.path\" {source['path']} ({unexpected[0]}): "
                f"it is a {denoiser_name(source)} of another size or family (e.g. SDXL's UNet vs SD 1.5's) than the one "
                "this LoRA was distilled on; set \"source.path\" in this file to that pipeline folder"
            )
        return cls(shared, meta["role"])


# -- building the three networks ----------------------------------------------------------------
def lora_denoisers(teacher, config, lora: LoRASettings, source: dict | None = None, gradient_checkpointing: bool = False,
                   student_lora=None):
    """Teacher, student and fake :class:`Denoiser` s over one base (``lora.fake == "shared"``).

    ``teacher`` is a plain Denoiser whose model is a backbone adapter; its base weights get the LoRA
    layers injected (the returned teacher runs them disabled). ``config`` is the :class:`TDMConfig`
    (its ``steps``/``steps_conditioning`` decide the students' steps embedding). ``student_lora``: the
    student's own LoraConfig (a LoRA it continues from, :func:`read_lora_folder`) instead of ``lora``'s.
    """
    from .denoiser import Denoiser

    adapter = teacher.model
    steps_set = config.steps if config.steps_conditioning else None
    fake_cfg = lora.peft_config(lora.fake_rank)
    student_cfg = student_lora or lora.peft_config()
    if lora.fake == "shared":
        shared = SharedLoRABase(adapter, {"student": student_cfg, "fake": fake_cfg}, source)
        fake_shared = shared
    else:
        fake_adapter = copy.deepcopy(adapter)
        shared = SharedLoRABase(adapter, {"student": student_cfg}, source)
        fake_shared = SharedLoRABase(fake_adapter, {"fake": fake_cfg}, source)
    if gradient_checkpointing:
        shared.enable_gradient_checkpointing()
        if fake_shared is not shared:
            fake_shared.enable_gradient_checkpointing()

    def make(shared_base, role, steps, owns_base=None):
        model = LoRARole(shared_base, role, owns_base)
        return Denoiser(model, teacher.schedule, teacher.prediction_type, teacher.null_cond, steps)

    new_teacher = make(shared, None, None)
    student = make(shared, "student", steps_set)
    fake = make(fake_shared, "fake", steps_set, owns_base=fake_shared is not shared)  # a copied base moves with the fake
    return new_teacher, student, fake


# -- export ---------------------------------------------------------------------------------
def role_of(student) -> LoRARole:
    model = getattr(student, "model", student)
    if not isinstance(model, LoRARole) or model.role is None:
        raise TypeError("expected a LoRA student Denoiser (built by tdm_fast.lora.lora_denoisers)")
    return model


def _merged_inner(role: LoRARole, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of the base diffusers model with ``role``'s LoRA merged in: no LoRA layers, no hooks;
    ``dtype`` casts the copy before the merge (a bf16 base then merges its fp32 LoRA without rounding)."""
    inner = copy.deepcopy(role.shared.adapter.inner)
    if dtype is not None:
        nn.Module.to(inner, dtype)  # not ModelMixin.to, which warns about its fp32-kept modules on every cast
    for layer in _tuner_layers(inner):
        layer.merge(adapter_names=[role.role])
    remove_lora(inner)
    for hook_owner in inner.modules():
        hook_owner._forward_hooks.clear()
    return inner


@torch.no_grad()
def merged_denoiser(student):
    """The LoRA student as a plain :class:`~tdm_fast.denoiser.Denoiser` around its adapter and a
    merged copy of the base (what export and ``torch.compile`` trace: the other roles' adapters and
    the role switching are gone). A steps-aware student keeps its K embedding and hook, so one
    model still serves every trained K. The merge is done in float32, so the result runs as a plain
    fp32 module even when the base was stored in bf16/fp16 for training; cast it as you deploy it."""
    from .denoiser import Denoiser

    role = role_of(student)
    adapter = role.shared.adapter
    model = type(adapter)(_merged_inner(role, torch.float32), **adapter.adapter_kwargs())
    merged = Denoiser(model, student.schedule.config, student.prediction_type, null_cond=student.null_cond,
                      steps_set=student.steps_set, time_embedding=adapter.time_embedding_module,
                      steps_embedding_dim=None if student.steps_embedding is None else student.steps_embedding.embedding.embedding_dim)
    if student.steps_embedding is not None:
        merged.steps_embedding.embedding.weight.copy_(student.steps_embedding.embedding.weight)
    return merged.to(next(student.parameters()).device).eval()


@torch.no_grad()
def fuse_student(student, steps: int | None = None) -> nn.Module:
    """A plain diffusers model (no LoRA, no hooks) computing the student; for a steps-aware student
    ``steps`` chooses the K whose embedding is folded into the timestep embedding's bias."""
    role = role_of(student)
    inner = _merged_inner(role)
    if student.steps_embedding is not None:
        if steps is None:
            raise ValueError(f"a steps-aware student needs steps= one of {student.steps_set} to fuse")
        idx = student.steps_set.index(steps)
        target = inner.get_submodule(student.time_embedding.removeprefix("base.inner."))
        fold_into_last_linear(target, student.steps_embedding.embedding.weight[idx].detach().float())
    return inner.requires_grad_(True)

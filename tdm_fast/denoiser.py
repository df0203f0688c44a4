"""The teacher protocol: any ``nn.Module`` called as ``model(x_t, t, cond)`` becomes a :class:`Denoiser`.

A denoiser knows its network's prediction type, its noise schedule and its unconditional condition,
and always answers with the pair (x0, ε) of spec §1. Students and fake scores are denoisers too;
for steps-aware ("unify") training they also receive the number of sampling steps K through a
zero-initialised embedding added to the network's timestep embedding (spec §6).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import device_assert
from .conditions import batch_size, concat, expand_null
from .parameterization import broadcast, check_prediction_type, from_x0_eps, to_x0_eps
from .schedule import NoiseSchedule, ScheduleConfig

DENOISER_CONFIG = "denoiser.json"
DENOISER_TENSORS = "denoiser.safetensors"
# A saved folder names the class of its network, and importing a module runs its code: only these
# packages (plus those in $TDM_FAST_TRUSTED_MODULES, comma-separated, or ``trusted=``) are imported.
TRUSTED_PACKAGES = ("tdm_fast", "diffusers")
TRUSTED_ENV = "TDM_FAST_TRUSTED_MODULES"
# Folders saved before the built-in demo networks moved into tdm_fast.demos name their old modules.
MOVED_MODULES = {"tdm_fast.digits": "tdm_fast.demos.digits", "tdm_fast.toy2d": "tdm_fast.demos.toy2d"}


def import_model_class(qualified: str, trusted=(), source: str | Path = "") -> type:
    """The class ``"module:QualName"`` names, imported only from a trusted package; ValueError otherwise."""
    where = f"{source}: " if source else ""
    module_name, _, class_name = str(qualified).partition(":")
    packages = TRUSTED_PACKAGES + tuple(trusted) + tuple(p.strip() for p in os.environ.get(TRUSTED_ENV, "").split(",") if p.strip())
    if not class_name or not any(module_name == p or module_name.startswith(p + ".") for p in packages):
        raise ValueError(f"{where}model class {qualified!r} is not from a trusted package ({', '.join(packages)}); "
                         f"if you wrote it, add its package to ${TRUSTED_ENV}")
    try:
        cls = importlib.import_module(MOVED_MODULES.get(module_name, module_name))
        for part in class_name.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}model class {qualified!r} cannot be imported: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_pretrained")):
        raise ValueError(f"{where}{qualified!r} is not a network class with from_pretrained")
    return cls


def _last_linear_width(module: nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot infer the timestep-embedding width of {type(module).__name__}; pass steps_embedding_dim")
    return linears[-1].out_features


class WrongBaseError(ValueError):
    """A saved network that refers to a base model of another backbone (a LoRA role, :mod:`tdm_fast.lora`)."""


class StepsEmbedding(nn.Module):
    """A learned embedding of K, added to the output of the network's timestep embedding.

    Zero-initialised, so a freshly conditioned copy of the teacher computes exactly the teacher.
    A forward hook is the injection point: the wrapped network's code stays untouched.
    """

    def __init__(self, steps_set: tuple[int, ...], dim: int):
        super().__init__()
        self.steps_set = tuple(sorted(steps_set))
        self.embedding = nn.Embedding(len(self.steps_set), dim)
        nn.init.zeros_(self.embedding.weight)
        self.current: torch.Tensor | None = None

    def index(self, steps, batch: int, device) -> torch.Tensor:
        steps = torch.as_tensor(steps, device=device).long().reshape(-1).expand(batch)
        table = torch.tensor(self.steps_set, device=device)
        match = steps.unsqueeze(-1) == table
        device_assert.check(match.any(-1), f"steps not in the trained set {self.steps_set}",
                            lambda: f": got {sorted(set(steps.tolist()))}")
        return match.float().argmax(-1)

    def hook(self, module, inputs, output):
        if self.current is None:
            raise RuntimeError("a steps-conditioned network was called without steps=K")
        emb = self.embedding(self.current).to(output.dtype)
        if output.shape[0] != emb.shape[0]:  # e.g. a video model repeats the embedding per frame
            emb = emb.repeat_interleave(output.shape[0] // emb.shape[0], dim=0)
        return output + emb.reshape(emb.shape[0], *([1] * (output.dim() - 2)), emb.shape[-1])


class Denoiser(nn.Module):
    """Wraps ``model(x_t, t, cond)`` and returns ``(x0, eps)``.

    Args:
        model: the network; ``t`` reaches it as an integer tensor of shape (B,).
        schedule: the forward process (a :class:`NoiseSchedule` or its config).
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``.
        null_cond: the unconditional condition for one sample (int class label, tensor or dict).
        steps_set: the K values of a steps-aware student; ``None`` for a plain denoiser.
        time_embedding: dotted name of the submodule whose output is the timestep embedding
            (required with ``steps_set``; defaults to the model's ``time_embedding_module`` attribute).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule | ScheduleConfig,
        prediction_type: str,
        null_cond=None,
        steps_set: tuple[int, ...] | None = None,
        time_embedding: str | None = None,
        steps_embedding_dim: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.schedule = schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule(schedule)
        self.prediction_type = check_prediction_type(prediction_type)
        self.null_cond = null_cond
        self.time_embedding = time_embedding or getattr(model, "time_embedding_module", None)
        self.steps_embedding = None
        if steps_set:
            if self.time_embedding is None:
                raise ValueError("steps_set needs time_embedding: the name of the model's timestep-embedding module")
            target = model.get_submodule(self.time_embedding)
            self.steps_embedding = StepsEmbedding(tuple(steps_set), steps_embedding_dim or _last_linear_width(target))
            target.register_forward_hook(self.steps_embedding.hook)

    @property
    def steps_set(self) -> tuple[int, ...] | None:
        return None if self.steps_embedding is None else self.steps_embedding.steps_set

    def forward(self, x_t: torch.Tensor, t, cond, steps=None) -> tuple[torch.Tensor, torch.Tensor]:
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(b)
        if batch_size(cond) != b:
            raise ValueError(f"cond has batch {batch_size(cond)} but x_t has batch {b}")
        if self.steps_embedding is not None:
            self.steps_embedding.current = self.steps_embedding.index(steps, b, x_t.device)
        output = self.model(x_t, t, cond)
        if output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} differs from x_t shape {tuple(x_t.shape)}")
        alpha, sigma = self.schedule(t, dtype=torch.float32)
        x0, eps = to_x0_eps(output.float(), x_t.float(), alpha, sigma, self.prediction_type)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    def uncond(self, cond):
        if self.null_cond is None:
            raise ValueError("this denoiser has no null_cond, so classifier-free guidance is unavailable")
        return expand_null(self.null_cond, batch_size(cond), like=cond)

    def cond_uncond(self, x_t, t, cond, steps=None):
        """Conditional and unconditional predictions from one batched call: ((x0_c, eps_c), (x0_u, eps_u))."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(b)
        x0, eps = self(torch.cat([x_t, x_t]), torch.cat([t, t]), concat(cond, self.uncond(cond)), steps)
        return (x0[:b], eps[:b]), (x0[b:], eps[b:])

    def guided(self, x_t, t, cond, cfg_scale: float, steps=None):
        """CFG prediction ``D_u + w (D_c - D_u)`` for x0 and ε (a plain call when w == 1)."""
        if cfg_scale == 1.0:
            return self(x_t, t, cond, steps)
        (x0_c, eps_c), (x0_u, eps_u) = self.cond_uncond(x_t, t, cond, steps)
        return x0_u + cfg_scale * (x0_c - x0_u), eps_u + cfg_scale * (eps_c - eps_u)

    # -- serialization -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Writes the network (its own ``save_pretrained``), the schedule and the steps embedding."""
        path = Path(path)
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError(f"{type(self.model).__name__} has no save_pretrained; use a diffusers ModelMixin model")
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "model")
        tensors = {}
        null = self.null_cond
        if isinstance(null, dict):
            tensors.update({f"null_cond.{k}": v.contiguous() for k, v in null.items()})
            null = {"dict": sorted(null)}
        elif isinstance(null, torch.Tensor):
            tensors["null_cond"] = null.contiguous()
            null = {"tensor": True}
        if self.steps_embedding is not None:
            tensors["steps_embedding"] = self.steps_embedding.embedding.weight.detach().contiguous()
        save_file({k: v.cpu() for k, v in tensors.items()}, path / DENOISER_TENSORS)
        config = {
            "model_class": f"{type(self.model).__module__}:{type(self.model).__qualname__}",
            "prediction_type": self.prediction_type,
            "schedule": self.schedule.config.to_dict(),
            "null_cond": null,
            "steps_set": list(self.steps_set) if self.steps_set else None,
            "time_embedding": self.time_embedding,
        }
        (path / DENOISER_CONFIG).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, trusted=(), **model_kwargs) -> "Denoiser":
        """Loads a :meth:`save_pretrained` folder. Every problem with the folder (missing or corrupt file,
        unknown or untrusted network class, bad settings) is a ValueError that names the file."""
        path = Path(path)
        config_file = path / DENOISER_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved denoiser (no {DENOISER_CONFIG})")
        try:
            config = json.loads(config_file.read_text())
            keys = ("model_class", "prediction_type", "schedule", "null_cond", "steps_set", "time_embedding")
            missing = [k for k in keys if not isinstance(config, dict) or k not in config]
        except (OSError, ValueError) as exc:
            raise ValueError(f"{config_file} is not valid JSON: {' '.join(str(exc).split())}") from None
        if missing:
            raise ValueError(f"{config_file} lacks {', '.join(missing)}: not a denoiser config, or a damaged one")
        model_cls = import_model_class(config["model_class"], trusted, config_file)
        model_dir = path / "model"
        if not model_dir.is_dir():
            raise ValueError(f"{model_dir} is missing: {path} holds no network (an incomplete copy of a saved denoiser?)")
        try:
            model = model_cls.from_pretrained(model_dir, **model_kwargs)
        except WrongBaseError:
            raise  # names its file and the fix already
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            raise ValueError(f"{model_dir}: cannot load the network ({_first_line(exc)})") from None
        tensors = _load_tensors(path / DENOISER_TENSORS)
        try:
            null = config["null_cond"]
            if isinstance(null, dict) and "dict" in null:
                null = {k: tensors[f"null_cond.{k}"] for k in null["dict"]}
            elif isinstance(null, dict):
                null = tensors["null_cond"]
            schedule = dict(config["schedule"])
            if schedule.get("trained_betas") is not None:
                schedule["trained_betas"] = tuple(schedule["trained_betas"])
            denoiser = cls(
                model,
                ScheduleConfig(**schedule),
                config["prediction_type"],
                null_cond=null,
                steps_set=tuple(config["steps_set"]) if config["steps_set"] else None,
                time_embedding=config["time_embedding"],
            )
            if denoiser.steps_embedding is not None:
                denoiser.steps_embedding.embedding.weight.data.copy_(tensors["steps_embedding"])
        except KeyError as exc:
            raise ValueError(f"{path / DENOISER_TENSORS} lacks the tensor {exc}") from None
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{config_file}: inconsistent settings ({_first_line(exc)})") from None
        except ValueError as exc:
            raise ValueError(f"{config_file}: {exc}") from None
        return denoiser


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _load_tensors(file: Path) -> dict:
    if not file.is_file():
        raise ValueError(f"{file} is missing")
    try:
        return load_file(file)
    except Exception as exc:  # safetensors raises its own error type on a damaged header
        raise ValueError(f"{file} is not a readable safetensors file ({_first_line(exc)})") from None


def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator, cond_dropout: float = 0.0):
    """DDPM training loss of a teacher: regress the network's own target (ε, v, x0 or flow velocity)
    at a uniform timestep, with each condition replaced by ``∅`` at rate ``cond_dropout`` (for CFG)."""
    b = x0.shape[0]
    t = torch.randint(0, denoiser.schedule.num_train_timesteps, (b,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    alpha, sigma = denoiser.schedule(t)
    x_t = broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps
    drop = torch.rand(b, generator=generator) < cond_dropout
    cond = torch.where(broadcast(drop, cond), expand_null(denoiser.null_cond, b, like=cond), cond)
    target = from_x0_eps(x0, eps, alpha, sigma, denoiser.prediction_type)
    return (denoiser.model(x_t, t, cond) - target).pow(2).mean()


def load_denoiser(path: str | Path) -> Denoiser:
    """A saved denoiser from its folder or from a run folder (its ``student/``); a folder that is not one
    (missing, a diffusers LoRA, something else) is refused as a :class:`~tdm_fast.usage.UsageError`."""
    return Denoiser.from_pretrained(denoiser_folder(path))


def denoiser_folder(path: str | Path) -> Path:
    """The folder :func:`load_denoiser` reads for ``path`` (a run folder: its ``student/``)."""
    from .usage import UsageError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if (path / "student").is_dir() and not (path / DENOISER_CONFIG).exists():
        path = path / "student"
    if not (path / DENOISER_CONFIG).is_file() and (path / "pytorch_lora_weights.safetensors").is_file():
        student = path.parent / "student"
        raise UsageError(f"{path} is a diffusers LoRA (for pipe.load_lora_weights on its base pipeline), not a saved denoiser: "
                         f"give the run's student folder{f' ({student})' if student.is_dir() else ''} or the run folder")
    if not (path / DENOISER_CONFIG).is_file():
        raise UsageError(f"{path} is not a saved denoiser (expected {path / DENOISER_CONFIG})")
    return path

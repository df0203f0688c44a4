"""Every setting of a TDM run, with the defaults of the authors' public training code (spec §3)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .sampling import stage_times

MATCHING = ("noisy", "clean")
TAU_INTERVALS = ("disjoint", "full")
KERNEL_CHOICES = ("fused", "reference")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TDMConfig:
    # the student
    steps: tuple[int, ...] = (4,)  # one K, or several for a steps-aware ("unify") student
    steps_conditioning: bool | None = None  # feed K to student and fake; default: on for several K
    total_steps: int = 900  # T' of spec §2
    # the objective
    cfg_scale: float = 4.5
    huber_c: float | None = 1e-3  # None: plain MSE
    normalize: bool = True
    matching: str = "noisy"  # "clean" is the DMD-style ablation
    importance_sampling: bool = True
    tau_interval: str = "disjoint"  # "full": τ up to T (ablation)
    snr_cap: float = 5.0
    # optimisation
    fake_lr: float = 1e-4
    generator_lr_ratio: float = 0.2  # generator lr = fake lr / 5
    # The zero-initialised K embeddings learn at this multiple of their network's lr: at the
    # network's own lr they stay ~1e-3 of the timestep embedding's size for hundreds of iterations
    # (measured on the digits student), i.e. K-conditioning would be off in all but name.
    steps_embedding_lr_ratio: float = 10.0
    adam_beta1: float = 0.0
    adam_beta2: float = 0.95
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    fake_updates: int = 1  # fake-score updates per generator update
    warmup_steps: int = 0
    ema_decay: float | None = None
    batch_size: int = 64
    iterations: int = 1000
    seed: int = 0
    mixed_precision: str = "no"
    kernels: str = "fused"
    # bookkeeping
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 2
    log_every: int = 10

    def __post_init__(self):
        self.steps = tuple(int(k) for k in (self.steps if isinstance(self.steps, (list, tuple)) else [self.steps]))
        if not self.steps or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps must be a non-empty set of distinct K values, got {self.steps}")
        for k in self.steps:
            stage_times(k, self.total_steps)
        if self.steps_conditioning is None:
            self.steps_conditioning = len(self.steps) > 1
        for name, value, allowed in (
            ("matching", self.matching, MATCHING),
            ("tau_interval", self.tau_interval, TAU_INTERVALS),
            ("kernels", self.kernels, KERNEL_CHOICES),
            ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("batch_size", "iterations", "fake_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fake_lr <= 0 or self.generator_lr_ratio <= 0 or self.steps_embedding_lr_ratio <= 0:
            raise ValueError("fake_lr, generator_lr_ratio and steps_embedding_lr_ratio must be positive")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.cfg_scale != self.cfg_scale:
            raise ValueError("cfg_scale is NaN")

    @property
    def generator_lr(self) -> float:
        return self.fake_lr * self.generator_lr_ratio

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TDMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> "TDMConfig":
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.from_dict(data)

"""Noise schedules: the α_t, σ_t tables of spec §1, built from a diffusers scheduler config."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class ScheduleConfig:
    """The subset of a diffusers scheduler config that defines the forward process.

    ``kind`` is ``"vp"`` (DDPM-style betas) or ``"flow"`` (rectified flow, ``x_t = (1-σ) x0 + σ ε``).
    """

    kind: str = "vp"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    shift: float = 1.0
    trained_betas: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"schedule kind must be 'vp' or 'flow', got {self.kind!r}")
        if self.kind == "vp" and self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    @classmethod
    def from_diffusers(cls, config) -> "ScheduleConfig":
        """Accepts a diffusers scheduler, its ``config`` or a plain dict (e.g. ``scheduler_config.json``)."""
        if hasattr(config, "config"):
            config = config.config
        config = dict(config)
        name = str(config.get("_class_name", ""))
        steps = int(config.get("num_train_timesteps", 1000))
        if "FlowMatch" in name or ("shift" in config and "beta_start" not in config):
            return cls(kind="flow", num_train_timesteps=steps, shift=float(config.get("shift", 1.0)))
        betas = config.get("trained_betas")
        return cls(
            kind="vp",
            num_train_timesteps=steps,
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config.get("beta_schedule", "linear")),
            trained_betas=tuple(float(b) for b in betas) if betas is not None else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _betas(config: ScheduleConfig) -> torch.Tensor:
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float64)
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, as diffusers computes it.
    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
    )


class NoiseSchedule:
    """Tables of α_t and σ_t for integer t in [0, T), kept in float64 and cast on lookup."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        n = self.config.num_train_timesteps
        if self.config.kind == "vp":
            alphas_cumprod = torch.cumprod(1.0 - _betas(self.config), dim=0)
            self.alphas = alphas_cumprod.sqrt()
            self.sigmas = (1.0 - alphas_cumprod).sqrt()
        else:
            u = torch.arange(n, dtype=torch.float64) / n
            shift = self.config.shift
            self.sigmas = shift * u / (1 + (shift - 1) * u)
            self.alphas = 1.0 - self.sigmas

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def is_flow(self) -> bool:
        return self.config.kind == "flow"

    def __call__(self, t: torch.Tensor | int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t, σ_t for integer timesteps ``t`` (a tensor of any shape, or an int)."""
        t = torch.as_tensor(t, device=device)
        if t.dtype.is_floating_point:
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t.min()}..{t.max()}")
        idx = t.cpu().long()
        return (
            self.alphas[idx].to(device=t.device, dtype=dtype),
            self.sigmas[idx].to(device=t.device, dtype=dtype),
        )

    def snr(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        alpha, sigma = self(t, dtype=torch.float64)
        return (alpha**2 / sigma.clamp_min(1e-12) ** 2).to(dtype)

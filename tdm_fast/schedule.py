"""Noise schedules: the α_t, σ_t tables of spec §1, built from a diffusers scheduler config.

:meth:`ScheduleConfig.from_diffusers` is the one conversion of a diffusers scheduler config into the
forward process (the presets, ``TDMScheduler`` and user code all go through it): every beta schedule
diffusers' DDPM/DDIM schedulers support, CogVideoX's SNR shift, zero-terminal-SNR rescaling, trained
betas, and flow matching with its shift. It is tested against the schedulers' own tables.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from . import device_assert

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


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
    snr_shift_scale: float | None = None  # CogVideoX: ᾱ / (s + (1 - s) ᾱ)
    rescale_zero_snr: bool = False  # Lin et al. 2024: ᾱ_{T-1} = 0, as diffusers' rescale_betas_zero_snr

    def __post_init__(self):
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"schedule kind must be 'vp' or 'flow', got {self.kind!r}")
        if self.kind == "vp" and self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.snr_shift_scale is not None and self.snr_shift_scale <= 0:
            raise ValueError(f"snr_shift_scale must be positive, got {self.snr_shift_scale}")

    @classmethod
    def from_diffusers(cls, config) -> "ScheduleConfig":
        """Accepts a diffusers scheduler, its ``config`` or a plain dict (e.g. ``scheduler_config.json``)."""
        if hasattr(config, "config"):
            config = config.config
        config = dict(config)
        name = str(config.get("_class_name", ""))
        steps = int(config.get("num_train_timesteps", 1000))
        if "FlowMatch" in name or ("shift" in config and "beta_start" not in config):
            # resolution-dependent shifts (Flux) and stretched terminal sigmas change the table per call
            for key in ("use_dynamic_shifting", "shift_terminal", "invert_sigmas", "use_karras_sigmas",
                        "use_exponential_sigmas", "use_beta_sigmas"):
                if config.get(key):
                    raise ValueError(f"scheduler config sets {key}={config[key]!r}: tdm-fast distils flow-matching "
                                     "teachers with a fixed shift only")
            return cls(kind="flow", num_train_timesteps=steps, shift=float(config.get("shift", 1.0)))
        betas = config.get("trained_betas")
        shift_scale = config.get("snr_shift_scale")
        return cls(
            kind="vp",
            num_train_timesteps=steps,
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config.get("beta_schedule", "linear")),
            trained_betas=tuple(float(b) for b in betas) if betas is not None else None,
            snr_shift_scale=float(shift_scale) if shift_scale is not None else None,
            rescale_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
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
    if config.beta_schedule == "sigmoid":  # GeoDiff's, as diffusers' DDPMScheduler computes it
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (config.beta_end - config.beta_start) + config.beta_start
    # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, as diffusers computes it.
    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
    )


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """ᾱ_t of a VP schedule (float64): betas, then CogVideoX's SNR shift, then zero-terminal-SNR rescaling."""
    ac = torch.cumprod(1.0 - _betas(config), dim=0)
    if config.snr_shift_scale is not None:
        ac = ac / (config.snr_shift_scale + (1 - config.snr_shift_scale) * ac)
    if config.rescale_zero_snr:
        # shift √ᾱ so that its last value is 0 and scale it so that its first value is kept
        root = ac.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        ac = ((root - last) * first / (first - last)) ** 2
    return ac


class NoiseSchedule:
    """Tables of α_t and σ_t for integer t in [0, T), kept in float64 and cast on lookup.

    ``table``: a VP schedule's ᾱ_t as another implementation holds it (a stock diffusers scheduler's
    float32 cumulative product, which a sampler reproducing that scheduler must use to agree with it to
    fp32 rounding); None computes it from ``config`` in float64."""

    def __init__(self, config: ScheduleConfig | None = None, table: torch.Tensor | None = None):
        self.config = config or ScheduleConfig()
        self._device_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        n = self.config.num_train_timesteps
        if table is not None and (self.config.kind != "vp" or tuple(table.shape) != (n,)):
            raise ValueError(f"a given ᾱ table needs a VP schedule of {n} timesteps, got shape {tuple(table.shape)}")
        if self.config.kind == "vp":
            ac = alphas_cumprod(self.config) if table is None else table.to(torch.float64)
            self.alphas = ac.sqrt()
            self.sigmas = (1.0 - ac).sqrt()
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
        """α_t, σ_t for integer timesteps ``t`` (a tensor of any shape, or an int).

        On an accelerator the lookup stays there: the tables are kept per device and the range check is
        an asynchronous device assertion, so a training step does not wait for the host."""
        t = torch.as_tensor(t, device=device)
        if t.dtype.is_floating_point:
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        n = self.num_train_timesteps
        device_assert.check((t >= 0) & (t < n), f"timesteps must lie in [0, {n})", lambda: f", got {t.min()}..{t.max()}")
        alphas, sigmas = self._tables(t.device)
        idx = t.long()
        return alphas[idx].to(dtype), sigmas[idx].to(dtype)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self.alphas, self.sigmas
        key = str(device)
        if key not in self._device_tables:
            wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            self._device_tables[key] = (self.alphas.to(device, wide), self.sigmas.to(device, wide))
        return self._device_tables[key]

    def snr(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        alpha, sigma = self(t, dtype=torch.float64)
        return (alpha**2 / sigma.clamp_min(1e-12) ** 2).to(dtype)

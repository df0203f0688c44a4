"""``SD3Transformer2DModel`` (SD3 / SD3.5, rectified flow) as a ``model(x_t, t, cond)``."""
from __future__ import annotations

import torch

from ..schedule import NoiseSchedule, ScheduleConfig
from .base import DiffusersAdapter


class SD3Adapter(DiffusersAdapter):
    """``cond`` is a dict with ``encoder_hidden_states`` (B, L, 4096) and ``pooled_projections`` (B, 2048).

    The engine's integer t maps to σ_t = shift(t/T) (the flow :class:`NoiseSchedule`), and the
    transformer receives ``σ_t · T`` as a float — what ``StableDiffusion3Pipeline`` passes with
    ``FlowMatchEulerDiscreteScheduler`` and with :class:`tdm_fast.TDMScheduler`. A floating-point t is that
    model time already: a stock scheduler's σ grid (DPM-Solver's, of a converted release) need not be any
    σ_t. The output is the velocity ``ε − x0`` (prediction type ``flow``).
    """

    time_embedding_module = "inner.time_text_embed.timestep_embedder"

    def __init__(self, inner, shift: float = 3.0, num_train_timesteps: int = 1000):
        super().__init__(inner)
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        schedule = NoiseSchedule(ScheduleConfig(kind="flow", num_train_timesteps=self.num_train_timesteps, shift=self.shift))
        self.register_buffer("model_timesteps", (schedule.sigmas * self.num_train_timesteps).float(), persistent=False)

    def adapter_kwargs(self) -> dict:
        return {"shift": self.shift, "num_train_timesteps": self.num_train_timesteps}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        timestep = t if t.is_floating_point() else self.model_timesteps.to(x_t.device)[t.long()]
        return self.inner(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

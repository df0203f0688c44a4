"""``TDMScheduler``: the student's K-step sampler (spec §2) as a diffusers scheduler.

``set_timesteps(K)`` gives t_0 = T'-1, t_{i+1} = t_i - T'/K (K=4, T'=900: [899, 674, 449, 224]);
``step`` turns the model output into (x̂0, ε̂) and makes the deterministic jump to the next stage's
time; the last step returns x̂0 itself. ``solver="dpmsolver"`` makes that jump DPM-Solver++(2M)'s
(:mod:`tdm_fast.solvers`: the scheduler keeps the previous stage's x̂0) for a student trained, or to be
tested, on that trajectory; the flag is saved with the config, so ``from_pretrained`` samples the same
way. The arithmetic is that of :func:`tdm_fast.sampling.sample_student` (float64 tables cast to
float32, fp32 conversions), so a stock diffusers pipeline with ``guidance_scale=1`` reproduces our
sampler to fp32 rounding.

Flow-matching models (SD3): ``schedule="flow"``; the integer stage times map to σ_t = shift(t/T),
and ``timesteps`` holds ``σ_t · T`` (float), which is what ``StableDiffusion3Pipeline`` passes to
the transformer. The pipeline's ``sigmas=`` / ``mu=`` arguments are accepted and ignored: the stage
times are fixed by the distillation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .parameterization import broadcast, check_prediction_type, to_x0_eps
from .sampling import stage_times
from .schedule import NoiseSchedule, ScheduleConfig
from .solvers import check_solver, correct, multistep_coefficients

# diffusers' names for prediction types, mapped to ours
_PREDICTION_ALIASES = {"flow_prediction": "flow"}


@dataclass
class TDMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class TDMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic few-step sampler of a TDM student.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the VP forward
            process (as in DDIM/DDPM configs; ``from_config`` of the teacher's scheduler copies them).
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (``flow_prediction``).
        total_steps: T' of the distillation (900 by default).
        schedule: ``"vp"`` or ``"flow"``; ``None`` infers flow from ``prediction_type`` or a
            flow-matching teacher config (``shift`` without betas).
        shift: the flow schedule's shift (SD3: 3.0).
        solver: ``"ddim"`` (spec §2) or ``"dpmsolver"`` (DPM-Solver++(2M) over the stage times).
    """

    _compatibles = [
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler", "CogVideoXDDIMScheduler",
        "CogVideoXDPMScheduler",
    ]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        total_steps: int = 900,
        schedule: str | None = None,
        shift: float = 1.0,
        snr_shift_scale: float | None = None,
        rescale_betas_zero_snr: bool = False,
        solver: str = "ddim",
    ):
        check_solver(solver)
        prediction_type = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
        check_prediction_type(prediction_type)
        kind = schedule or ("flow" if prediction_type == "flow" else "vp")
        if kind == "flow" and prediction_type != "flow":
            # a FlowMatch teacher config has no prediction_type entry; from_config leaves our default
            prediction_type = "flow"
            self.register_to_config(prediction_type="flow")
        self.register_to_config(schedule=kind)
        self.prediction_type = prediction_type
        self.noise_schedule = NoiseSchedule(
            ScheduleConfig(
                kind=kind,
                num_train_timesteps=num_train_timesteps,
                beta_start=beta_start,
                beta_end=beta_end,
                beta_schedule=beta_schedule,
                shift=float(shift),
                trained_betas=tuple(float(b) for b in trained_betas) if trained_betas is not None else None,
                snr_shift_scale=None if kind == "flow" or snr_shift_scale is None else float(snr_shift_scale),
                rescale_zero_snr=kind != "flow" and bool(rescale_betas_zero_snr),
            )
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.stage_times: list[int] = []
        self.coefficients: list[float] = []
        self._previous = None  # (stage index, x̂0) of the last step: DPM-Solver's history
        self.timesteps = torch.tensor([], dtype=torch.long)
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """Accepts any diffusers scheduler config (DDIM, Euler, FlowMatch, CogVideoX...)."""
        if config is not None:
            config = dict(config.config if hasattr(config, "config") and not isinstance(config, dict) else config)
            name = str(config.get("_class_name", ""))
            if "FlowMatch" in name or ("shift" in config and "beta_start" not in config):
                config.setdefault("schedule", "flow")
                config["prediction_type"] = "flow"
        return super().from_config(config, **kwargs)

    # -- the diffusers scheduler API ----------------------------------------------------------
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None, timesteps=None, **kwargs):
        """The K stage times of spec §2. ``sigmas``/``mu``/``timesteps`` from pipelines are ignored
        (the distilled student only knows its own times) unless ``timesteps`` equals them."""
        if num_inference_steps is None:
            if sigmas is not None:
                num_inference_steps = len(sigmas)
            elif timesteps is not None:
                num_inference_steps = len(timesteps)
            else:
                raise ValueError("set_timesteps needs num_inference_steps")
        k = int(num_inference_steps)
        self.num_inference_steps = k
        self.stage_times = stage_times(k, int(self.config.total_steps), int(self.config.num_train_timesteps))
        self.coefficients = multistep_coefficients(self.noise_schedule, self.stage_times, self.config.solver)
        self._previous = None
        t = torch.tensor(self.stage_times, dtype=torch.long)
        if self.noise_schedule.is_flow:
            self.sigmas = self.noise_schedule.sigmas[t].float()
            self.timesteps = (self.noise_schedule.sigmas[t] * self.config.num_train_timesteps).float().to(device)
        else:
            _, sigma = self.noise_schedule(t)
            self.sigmas = sigma
            self.timesteps = t.to(device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep) -> int:
        value = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        matches = (self.timesteps.cpu().double() - value).abs() < 1e-3
        if not matches.any():
            raise ValueError(
                f"timestep {value} is not one of TDMScheduler's stage times {self.timesteps.tolist()}; "
                "call set_timesteps(num_inference_steps) with the student's K"
            )
        return int(matches.nonzero()[0])

    def _stage_alpha_sigma(self, index: int, device):
        t = torch.tensor([self.stage_times[index]])
        alpha, sigma = self.noise_schedule(t, dtype=torch.float32)
        return alpha.to(device), sigma.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        """x̂0, ε̂ at the current stage time, then x_{t_{i+1}} = α x̂0 + σ ε̂ (last stage: x̂0).

        With ``solver="dpmsolver"`` the jump is made from DPM-Solver++(2M)'s corrected (x̂0, ε̂) when the
        previous stage was stepped just before (a run started mid-trajectory takes a first-order step
        first, as diffusers' multistep schedulers do)."""
        if not self.stage_times:
            raise ValueError("call set_timesteps before step")
        index = self.index_for_timestep(timestep)
        alpha, sigma = self._stage_alpha_sigma(index, sample.device)
        x0, eps = to_x0_eps(model_output.float(), sample.float(), alpha.expand(sample.shape[0]), sigma.expand(sample.shape[0]), self.prediction_type)
        x0, eps = x0.to(sample.dtype), eps.to(sample.dtype)
        if index + 1 < len(self.stage_times):
            a_next, s_next = self._stage_alpha_sigma(index + 1, sample.device)
            a_next, s_next = a_next.expand(sample.shape[0]), s_next.expand(sample.shape[0])
            jump_x0, jump_eps = x0.float(), eps.float()
            if self.coefficients[index] and self._previous is not None and self._previous[0] == index - 1:
                jump_x0, jump_eps = correct(jump_x0, jump_eps, self._previous[1], self.coefficients[index], alpha, sigma)
            prev = (broadcast(a_next, x0) * jump_x0 + broadcast(s_next, x0) * jump_eps).to(sample.dtype)
        else:
            prev = x0
        self._previous = (index, x0.float())
        self._step_index = index + 1
        if not return_dict:
            return (prev, x0)
        return TDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """q(x_t | x0) at integer training timesteps (or flow model timesteps σ·T)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if timesteps.dtype.is_floating_point and self.noise_schedule.is_flow:
            table = self.noise_schedule.sigmas * self.config.num_train_timesteps
            timesteps = torch.stack([(table - float(v)).abs().argmin() for v in timesteps])
        elif timesteps.dtype.is_floating_point:
            timesteps = timesteps.round().long()
        alpha, sigma = self.noise_schedule(timesteps.cpu(), dtype=torch.float32)
        alpha = alpha.to(original_samples.device).expand(original_samples.shape[0])
        sigma = sigma.to(original_samples.device).expand(original_samples.shape[0])
        return (broadcast(alpha, original_samples) * original_samples.float() + broadcast(sigma, noise) * noise.float()).to(original_samples.dtype)

    def __len__(self):
        return self.config.num_train_timesteps

"""``TDMScheduler``: the student's K-step sampler (spec §2) as a diffusers scheduler.

``set_timesteps(K)`` gives t_0 = T'-1, t_{i+1} = t_i - T'/K (K=4, T'=900: [899, 674, 449, 224]);
``step`` turns the model output into (x̂0, ε̂) and makes the deterministic jump to the next stage's
time; the last step returns x̂0 itself. ``solver="dpmsolver"`` makes that jump DPM-Solver++(2M)'s
(:mod:`tdm_fast.solvers`: the scheduler keeps the previous stage's x̂0) for a student trained, or to be
tested, on that trajectory; the flag is saved with the config, so ``from_pretrained`` samples the same
way. The arithmetic is that of :func:`tdm_fast.sampling.sample_student` (float64 tables cast to
float32, fp32 conversions), so a stock diffusers pipeline with ``guidance_scale=1`` reproduces our
sampler to fp32 rounding. The τ-interval rule of training does not apply here: any K up to T' samples.

Students distilled elsewhere (the official TDM releases) were sampled by a stock scheduler:
:meth:`TDMScheduler.from_sampler_config` reproduces DPM-Solver++(2M) (VP, or flow σ with
``use_flow_sigmas``) and DDIM/CogVideoX-DDIM at η = 0 from their configs, with their
``timestep_spacing`` (``trailing``, ``linspace``, ``leading`` as that scheduler defines it), and refuses
a setting it cannot reproduce. Such a scheduler (``stock_scheduler`` in its config) holds that scheduler's
own float32 tables and lets it do the step arithmetic, so it agrees bit for bit: two roundings of the same
formula, amplified by a network with large LoRA weights, differ by ~1e-4 after 4 steps.
``set_timesteps(timesteps=...)`` / ``(sigmas=...)`` are honoured (with our own arithmetic).

Flow-matching models (SD3): ``schedule="flow"``; the integer stage times map to σ_t = shift(t/T),
and ``timesteps`` holds ``σ_t · T`` (float), which is what ``StableDiffusion3Pipeline`` passes to
the transformer (``FlowMatchEulerDiscreteScheduler``'s convention); with ``use_flow_sigmas`` the σ grid
and the ``int64(σ · T)`` timesteps are DPM-Solver's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .parameterization import broadcast, check_prediction_type, to_x0_eps
from .sampling import stage_times
from .schedule import NoiseSchedule, ScheduleConfig, alphas_cumprod
from .solvers import check_solver, correct, lambda_coefficients

# diffusers' names for prediction types, mapped to ours
_PREDICTION_ALIASES = {"flow_prediction": "flow"}
SPACINGS = ("trailing", "linspace", "leading")
_TO_X0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # the landing of a last step that outputs x̂0
# keys that say how a stock scheduler samples rather than what the forward process is: from_config of a
# teacher's config leaves them to the student's own stage times, from_sampler_config reproduces them
_SAMPLER_KEYS = ("timestep_spacing", "steps_offset", "use_flow_sigmas", "timestep_rules")


def default_total_steps(num_train_timesteps: int) -> int:
    """T' when none is given: 90% of T (the paper's 900 of 1000)."""
    return max(1, round(0.9 * num_train_timesteps))


@dataclass
class TDMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass(frozen=True)
class StagePlan:
    """One call of set_timesteps: (α, σ) where the model is evaluated and where each step lands (float64)."""

    points: torch.Tensor  # (K, 2)
    targets: torch.Tensor  # (K, 2): where step i lands (the next stage, or DDIM's t - T//K); (1, 0) is x̂0
    timesteps: torch.Tensor  # what the model is given
    stage_times: list[int]  # the integer training times of the stages ([] for a continuous σ grid)


class TDMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic few-step sampler of a TDM student.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the VP forward
            process (as in DDIM/DDPM configs; ``from_config`` of the teacher's scheduler copies them).
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (``flow_prediction``).
        total_steps: T' of the distillation (None: 90% of ``num_train_timesteps``, 900 of 1000).
        schedule: ``"vp"`` or ``"flow"``; ``None`` infers flow from ``prediction_type`` or a
            flow-matching teacher config (``shift`` without betas).
        shift: the flow schedule's shift (SD3: 3.0; DPM-Solver configs call it ``flow_shift``).
        solver: ``"ddim"`` (spec §2) or ``"dpmsolver"`` (DPM-Solver++(2M) over the stage times).
        timestep_spacing: None (the stage times of T'), or a stock spacing (``trailing``, ``linspace``,
            ``leading``, with ``steps_offset``) as the scheduler of ``timestep_rules`` computes it.
        timestep_rules: ``"ddim"`` (DDIMScheduler's spacings; each step lands at t - T//K, which is t = 0
            rather than x̂0 where the last time is at least T//K) or ``"dpmsolver"``
            (DPMSolverMultistepScheduler's; each step lands on the next stage, the last on x̂0); None: the
            solver's. Used with ``timestep_spacing`` only.
        use_flow_sigmas: DPM-Solver's flow σ grid, σ_i = shift(u_i) for u = linspace(1 - 1/T, 0, K+1)[:-1],
            and ``int64(σ · T)`` model timesteps.
        stock_scheduler: the diffusers class this scheduler reproduces (set by ``from_sampler_config``): a VP
            schedule's tables are then that class's own (float32 betas and cumulative product, where ours are
            float64), and ``set_timesteps(K)`` runs that class's step on the same times.
        trained_steps: the step counts K the student was distilled for (written with a run's ``scheduler/``);
            ``set_timesteps`` with another ``num_inference_steps`` samples, with one warning per K.
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
        total_steps: int | None = None,
        schedule: str | None = None,
        shift: float = 1.0,
        snr_shift_scale: float | None = None,
        rescale_betas_zero_snr: bool = False,
        solver: str = "ddim",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        use_flow_sigmas: bool = False,
        timestep_rules: str | None = None,
        stock_scheduler: str | None = None,
        trained_steps: list[int] | None = None,
    ):
        check_solver(solver)
        if timestep_rules is not None:
            check_solver(timestep_rules)
        prediction_type = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
        check_prediction_type(prediction_type)
        if timestep_spacing is not None and timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be None (the stage times of T') or one of {SPACINGS}, got {timestep_spacing!r}")
        kind = schedule or ("flow" if prediction_type == "flow" else "vp")
        if kind == "flow" and prediction_type != "flow":
            # a FlowMatch teacher config has no prediction_type entry; from_config leaves our default
            prediction_type = "flow"
            self.register_to_config(prediction_type="flow")
        if use_flow_sigmas and kind != "flow":
            raise ValueError("use_flow_sigmas needs a flow-matching schedule (prediction_type flow_prediction)")
        self.register_to_config(schedule=kind)
        self.total_steps = default_total_steps(num_train_timesteps) if total_steps is None else int(total_steps)
        if not 0 < self.total_steps <= num_train_timesteps:
            raise ValueError(f"total_steps (T') must lie in (0, num_train_timesteps={num_train_timesteps}], got {total_steps}")
        self.prediction_type = prediction_type
        self._warned_steps: set[int] = set()
        betas = tuple(float(b) for b in trained_betas) if trained_betas is not None else None
        vp = ScheduleConfig(kind="vp", num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                            beta_schedule=beta_schedule, trained_betas=betas,
                            snr_shift_scale=None if snr_shift_scale is None else float(snr_shift_scale),
                            rescale_zero_snr=bool(rescale_betas_zero_snr))
        stock = self._stock_sampler() if stock_scheduler is not None and kind == "vp" else None
        if kind == "vp":
            self.noise_schedule = NoiseSchedule(vp, table=None if stock is None else stock.alphas_cumprod)
        else:
            self.noise_schedule = NoiseSchedule(replace(vp, kind="flow", shift=float(shift), snr_shift_scale=None,
                                                        rescale_zero_snr=False))
        self._set_beta_tables(vp, stock)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.stage_times: list[int] = []
        self.coefficients: list[float] = []
        self._plan: StagePlan | None = None
        self._previous = None  # (stage index, x̂0) of the last step: DPM-Solver's history
        self._stock_run = None  # the stock scheduler that steps a schedule of its own (stock_scheduler)
        self.timesteps = torch.tensor([], dtype=torch.long)
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    def _set_beta_tables(self, vp: ScheduleConfig, stock=None) -> None:
        """``betas``, ``alphas``, ``alphas_cumprod`` (float32) as diffusers' schedulers hold them: betas after
        zero-terminal-SNR rescaling, ᾱ after CogVideoX's SNR shift (a flow config keeps its beta keys' tables,
        as DPM-Solver's flow configs do); the ``stock`` scheduler's own where one is reproduced."""
        if stock is not None:
            self.betas, self.alphas, self.alphas_cumprod = (t.float().clone() for t in (stock.betas, stock.alphas, stock.alphas_cumprod))
            return
        unshifted = alphas_cumprod(replace(vp, snr_shift_scale=None))
        previous = torch.cat([torch.ones(1, dtype=torch.float64), unshifted[:-1]])
        self.betas = (1.0 - unshifted / previous).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod(vp).float()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Accepts any diffusers scheduler config (DDIM, Euler, FlowMatch, DPM-Solver, CogVideoX...): its forward
        process (betas, prediction type, flow shift, SNR shift, zero SNR). How that scheduler samples is not
        taken (the student samples at its own stage times): see :meth:`from_sampler_config`."""
        if config is not None:
            config = _forward_process_config(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_sampler_config(cls, config, **kwargs) -> "TDMScheduler":
        """The TDMScheduler that samples exactly as the stock scheduler of ``config`` does with guidance 1
        (η = 0): DPMSolverMultistepScheduler (dpmsolver++, order 1 or 2, midpoint), DDIMScheduler and
        CogVideoXDDIMScheduler. A setting it cannot reproduce is a ValueError naming the key."""
        config = _as_dict(config)
        name = str(config.get("_class_name", ""))
        if name == cls.__name__:
            return cls.from_config(config, **kwargs)
        if name == "DPMSolverMultistepScheduler":
            settings = _dpmsolver_settings(config)
        elif name in ("DDIMScheduler", "CogVideoXDDIMScheduler"):
            settings = _ddim_settings(config)
        else:
            raise ValueError(f"a {name or 'scheduler'} config cannot be reproduced by TDMScheduler: give a "
                             "DPMSolverMultistepScheduler, DDIMScheduler or CogVideoXDDIMScheduler config")
        merged = {k: v for k, v in config.items() if k not in _SAMPLER_KEYS}
        return super().from_config(_forward_process_config(merged), **{**settings, "stock_scheduler": name, **kwargs})

    @property
    def plan(self) -> StagePlan | None:
        """The constants of the run ``set_timesteps`` set up (what an exported sampler graph bakes in, with the
        solver's ``coefficients``); None before it."""
        return self._plan

    # -- the diffusers scheduler API ----------------------------------------------------------
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index
        if self._stock_run is not None:
            self._stock_run.set_begin_index(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None, timesteps=None, **kwargs):
        """The K stage times (``timestep_spacing`` None: spec §2's; else the stock spacing), or the given
        ``timesteps`` (integer training times of a VP model, model times σ·T of a flow model) or ``sigmas``
        (flow models; a final 0 is implied). ``mu`` (dynamic shifting) is refused: the shift is fixed."""
        if mu is not None:
            raise ValueError("TDMScheduler has a fixed flow shift (config shift): mu (dynamic shifting) does not apply")
        if timesteps is not None and sigmas is not None:
            raise ValueError("give timesteps= or sigmas=, not both")
        custom = timesteps if timesteps is not None else sigmas
        if custom is not None and num_inference_steps is not None and int(num_inference_steps) != len(custom):
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(custom)} custom "
                             f"{'timesteps' if timesteps is not None else 'sigmas'} were given")
        trained = self.config.trained_steps
        if custom is None and num_inference_steps is not None and trained and int(num_inference_steps) not in trained \
                and int(num_inference_steps) not in self._warned_steps:
            self._warned_steps.add(int(num_inference_steps))
            warnings.warn(f"num_inference_steps={num_inference_steps}: this student was distilled for K in {list(trained)}; "
                          "other step counts sample, but not the images it was trained for", UserWarning, stacklevel=2)
        if timesteps is not None:
            plan = self._custom_timesteps_plan(timesteps)
        elif sigmas is not None:
            plan = self._sigma_plan(_descending(sigmas, "sigmas", drop_final_zero=True), custom=True)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps, timesteps or sigmas")
        elif self.config.use_flow_sigmas:
            plan = self._sigma_plan(_dpmsolver_flow_sigmas(int(num_inference_steps), float(self.config.shift),
                                                           int(self.config.num_train_timesteps)))
        else:
            plan = self._integer_plan(self._spaced_times(int(num_inference_steps)))
        self._plan = plan
        self.num_inference_steps = len(plan.points)
        self.stage_times = plan.stage_times
        lam = (plan.points[:, 0].log() - plan.points[:, 1].log()).tolist()
        self.coefficients = lambda_coefficients(lam, self.config.solver)
        self.sigmas = plan.points[:, 1].float()
        self.timesteps = plan.timesteps.to(device)
        self._previous = None
        self._step_index = None
        self._begin_index = None
        self._stock_run = None
        if self.config.stock_scheduler is not None and custom is None:
            # the stock scheduler's own float32 arithmetic: a network with large weights amplifies the rounding
            # of another (equal in exact arithmetic) to ~1e-4 over 4 steps
            self._stock_run = self._stock_sampler()
            self._stock_run.set_timesteps(len(plan.points), device=device)

    def _stock_sampler(self):
        """The ``stock_scheduler`` this one reproduces, configured as ``from_sampler_config`` read it."""
        import diffusers

        config, name = self.config, self.config.stock_scheduler
        stock_class = getattr(diffusers, name, None) if name in self._compatibles else None
        if stock_class is None:
            raise ValueError(f"stock_scheduler must name one of {self._compatibles}, got {name!r}")
        if config.snr_shift_scale is not None and name != "CogVideoXDDIMScheduler":
            raise ValueError(f"{name} has no SNR shift, but the config sets snr_shift_scale={config.snr_shift_scale}")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
                "timestep_spacing", "steps_offset")
        settings = {key: config[key] for key in keys}
        settings["prediction_type"] = "flow_prediction" if config.prediction_type == "flow" else config.prediction_type
        if name == "DPMSolverMultistepScheduler":
            settings.update(algorithm_type="dpmsolver++", solver_order=2 if config.solver == "dpmsolver" else 1,
                            solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                            use_flow_sigmas=config.use_flow_sigmas, flow_shift=config.shift)
        else:
            settings.update(clip_sample=False, set_alpha_to_one=True)
        if name == "CogVideoXDDIMScheduler":  # 1: no shift, where its default is 3
            settings["snr_shift_scale"] = config.snr_shift_scale or 1.0
        return stock_class.from_config(settings)

    def _spaced_times(self, k: int) -> list[int]:
        """The integer stage times of K steps: spec §2's (T') or the stock spacing of the solver's scheduler."""
        n = int(self.config.num_train_timesteps)
        spacing = self.config.timestep_spacing
        if spacing is None:
            return stage_times(k, self.total_steps, n, training=False)
        multistep = self._rules() == "dpmsolver"  # DPMSolverMultistepScheduler's spacings, else DDIMScheduler's
        if spacing == "trailing":
            times = np.round(np.arange(n, 0, -n / k)) - 1
        elif spacing == "linspace":
            times = np.linspace(0, n - 1, k + 1).round()[::-1][:-1] if multistep else np.linspace(0, n - 1, k).round()[::-1]
        else:
            ratio = n // (k + 1) if multistep else n // k
            times = (np.arange(0, k + 1 if multistep else k) * ratio).round()[::-1][: k] + int(self.config.steps_offset)
        return _descending([int(t) for t in times], f"{spacing}-spaced timesteps for K={k}", integer_below=n)

    def _integer_plan(self, times: list[int]) -> StagePlan:
        n = int(self.config.num_train_timesteps)
        t = torch.tensor(times, dtype=torch.long)
        alpha, sigma = self.noise_schedule(t, dtype=torch.float64)
        points = torch.stack([alpha, sigma], 1)
        targets = torch.cat([points[1:], _TO_X0])
        if self.config.timestep_spacing is not None and self._rules() == "ddim":
            # DDIMScheduler lands at t - T//K: the next stage time unless T/K is fractional, and t >= 0 after
            # the last stage where T//K does not reach past 0 (linspace, or trailing with T % K != 0)
            for i, time in enumerate(times):
                if time - n // len(times) >= 0:
                    landing = torch.tensor([time - n // len(times)])
                    targets[i] = torch.cat(self.noise_schedule(landing, dtype=torch.float64))
        model_t = (sigma * n).float() if self.noise_schedule.is_flow else t
        return StagePlan(points, targets, model_t, list(times))

    def _rules(self) -> str:
        return self.config.timestep_rules or self.config.solver

    def _sigma_plan(self, sigmas: list[float], custom: bool = False) -> StagePlan:
        if not self.noise_schedule.is_flow:
            raise ValueError("sigmas= applies to flow-matching schedules; give a VP model's stage times as timesteps=")
        sigma = torch.tensor(sigmas, dtype=torch.float64)
        if custom and not (0 < float(sigma.min()) and float(sigma.max()) <= 1):
            raise ValueError(f"sigmas must lie in (0, 1], got {sigmas}")
        points = torch.stack([1.0 - sigma, sigma], 1)
        model_t = sigma * int(self.config.num_train_timesteps)
        # DPM-Solver's flow timesteps are int64(σ·T) (truncated); FlowMatch Euler passes σ·T itself
        model_t = model_t.to(torch.int64) if self.config.use_flow_sigmas else model_t.float()
        return StagePlan(points, torch.cat([points[1:], _TO_X0]), model_t, [])

    def _custom_timesteps_plan(self, timesteps) -> StagePlan:
        values = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        n = int(self.config.num_train_timesteps)
        if self.noise_schedule.is_flow:  # a flow model's time is σ·T
            sigmas = _descending([v / n for v in values], "timesteps / num_train_timesteps")
            return self._sigma_plan(sigmas, custom=True)
        if any(v != int(v) for v in values):
            raise ValueError(f"timesteps of a VP schedule are integer training times, got {values}")
        return self._integer_plan(_descending([int(v) for v in values], "timesteps", integer_below=n))

    def index_for_timestep(self, timestep) -> int:
        value = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        table = self.timesteps.cpu().double()
        if self._step_index is not None and self._step_index < len(table) and abs(float(table[self._step_index]) - value) < 1e-3:
            return self._step_index  # the next step of a run: right even where two model times coincide
        matches = (table - value).abs() < 1e-3
        if not matches.any():
            raise ValueError(
                f"timestep {value} is not one of TDMScheduler's stage times {self.timesteps.tolist()}; "
                "call set_timesteps(num_inference_steps) with the student's K"
            )
        return int(matches.nonzero()[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        """x̂0, ε̂ at the current stage time, then x_{t_{i+1}} = α x̂0 + σ ε̂ (last stage: x̂0).

        With ``solver="dpmsolver"`` the jump is made from DPM-Solver++(2M)'s corrected (x̂0, ε̂) when the
        previous stage was stepped just before (a run started mid-trajectory takes a first-order step
        first, as diffusers' multistep schedulers do)."""
        if self._plan is None:
            raise ValueError("call set_timesteps before step")
        index = self.index_for_timestep(timestep)
        if self._stock_run is not None:
            prev, x0 = self._stock_step(model_output, timestep, sample)
        else:
            prev, x0 = self._own_step(index, model_output, sample)
        self._step_index = index + 1
        if not return_dict:
            return (prev, x0)
        return TDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _stock_step(self, model_output, timestep, sample):
        out = self._stock_run.step(model_output, timestep, sample)
        # DPM-Solver keeps its converted outputs (x̂0, dpmsolver++) as its history rather than returning them
        x0 = out.pred_original_sample if hasattr(out, "pred_original_sample") else self._stock_run.model_outputs[-1]
        return out.prev_sample, x0.to(sample.dtype)

    def _own_step(self, index: int, model_output, sample):
        batch = sample.shape[0]
        alpha, sigma = (v.reshape(1).float().to(sample.device) for v in self._plan.points[index])
        x0, eps = to_x0_eps(model_output.float(), sample.float(), alpha.expand(batch), sigma.expand(batch), self.prediction_type)
        x0, eps = x0.to(sample.dtype), eps.to(sample.dtype)
        if float(self._plan.targets[index, 1]) > 0:
            a_next, s_next = (v.reshape(1).float().to(sample.device).expand(batch) for v in self._plan.targets[index])
            jump_x0, jump_eps = x0.float(), eps.float()
            if self.coefficients[index] and self._previous is not None and self._previous[0] == index - 1:
                jump_x0, jump_eps = correct(jump_x0, jump_eps, self._previous[1], self.coefficients[index], alpha, sigma)
            prev = (broadcast(a_next, x0) * jump_x0 + broadcast(s_next, x0) * jump_eps).to(sample.dtype)
        else:
            prev = x0
        self._previous = (index, x0.float())
        return prev, x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """q(x_t | x0) at integer training timesteps, or at model times of the current schedule (flow: σ·T,
        or DPM-Solver's int64(σ·T)), which take that stage's exact σ."""
        timesteps = torch.as_tensor(timesteps).reshape(-1).cpu()
        alpha, sigma = self._alpha_sigma_at(timesteps)
        alpha = alpha.to(original_samples.device).expand(original_samples.shape[0])
        sigma = sigma.to(original_samples.device).expand(original_samples.shape[0])
        return (broadcast(alpha, original_samples) * original_samples.float() + broadcast(sigma, noise) * noise.float()).to(original_samples.dtype)

    def _alpha_sigma_at(self, timesteps: torch.Tensor):
        if self._plan is not None and (self.noise_schedule.is_flow or not self._plan.stage_times):
            table = self._plan.timesteps.double()
            hits = [(table - float(v)).abs().lt(1e-3).nonzero() for v in timesteps]
            if all(len(h) for h in hits):
                points = self._plan.points[torch.cat([h[0] for h in hits])]
                return points[:, 0].float(), points[:, 1].float()
        if timesteps.dtype.is_floating_point and self.noise_schedule.is_flow:
            table = self.noise_schedule.sigmas * self.config.num_train_timesteps
            timesteps = torch.stack([(table - float(v)).abs().argmin() for v in timesteps])
        elif timesteps.dtype.is_floating_point:
            timesteps = timesteps.round().long()
        return self.noise_schedule(timesteps, dtype=torch.float32)

    def __len__(self):
        return self.config.num_train_timesteps


def _as_dict(config) -> dict:
    """A plain dict of a config, a FrozenDict or a scheduler (whose class names the config)."""
    if hasattr(config, "config") and not isinstance(config, dict):
        return {"_class_name": type(config).__name__, **config.config}
    return dict(config)


def _forward_process_config(config) -> dict:
    """A scheduler config with the keys TDMScheduler reads: flow detected (FlowMatch, DPM-Solver's flow σ),
    DPM-Solver's ``flow_shift`` as ``shift``, the values of every key kept; another scheduler's sampling keys
    dropped."""
    config = _as_dict(config)
    name = str(config.get("_class_name", ""))
    if name == TDMScheduler.__name__:
        return config
    # the other class's defaults are its forward process too (diffusers would swap in ours for them)
    config.pop("_use_default_values", None)
    flow_sigmas = bool(config.get("use_flow_sigmas")) or config.get("prediction_type") == "flow_prediction"
    if "FlowMatch" in name or ("shift" in config and "beta_start" not in config) or flow_sigmas:
        config.setdefault("schedule", "flow")
        config["prediction_type"] = "flow"
        if "flow_shift" in config and "shift" not in config:
            config["shift"] = float(config["flow_shift"])
    return {k: v for k, v in config.items() if k not in _SAMPLER_KEYS}


def _refuse(config: dict, name: str, checks: dict) -> None:
    """``checks``: key -> (default, allowed values); a value outside them is a ValueError naming the key."""
    for key, (default, allowed) in checks.items():
        value = config.get(key, default)
        if value not in allowed:
            raise ValueError(f"{name} config sets {key}={value!r}: TDMScheduler reproduces only {key} in {list(allowed)}")


def _dpmsolver_settings(config: dict) -> dict:
    name = "DPMSolverMultistepScheduler"
    order = config.get("solver_order", 2)
    _refuse(config, name, {
        "algorithm_type": ("dpmsolver++", ("dpmsolver++",)), "solver_order": (2, (1, 2)),
        "final_sigmas_type": ("zero", ("zero",)), "thresholding": (False, (False,)),
        "variance_type": (None, (None, "fixed_small")), "use_dynamic_shifting": (False, (False,)),
        "use_karras_sigmas": (False, (False,)), "use_lu_lambdas": (False, (False,)),
        "use_exponential_sigmas": (False, (False,)), "use_beta_sigmas": (False, (False,)),
        "lambda_min_clipped": (-float("inf"), (-float("inf"),)),
    })
    if order == 2:
        _refuse(config, name, {"solver_type": ("midpoint", ("midpoint",))})
    if config.get("rescale_betas_zero_snr") and not config.get("use_flow_sigmas"):
        raise ValueError(f"{name} config sets rescale_betas_zero_snr=True: DPM-Solver's 2**-24 clamp of the last ᾱ "
                         "is not reproduced by TDMScheduler")
    return {"solver": "dpmsolver" if order == 2 else "ddim", "timestep_rules": "dpmsolver",
            "timestep_spacing": config.get("timestep_spacing", "linspace"), "steps_offset": int(config.get("steps_offset", 0)),
            "use_flow_sigmas": bool(config.get("use_flow_sigmas", False))}


def _ddim_settings(config: dict) -> dict:
    name = str(config.get("_class_name"))
    _refuse(config, name, {"clip_sample": (True, (False,)), "thresholding": (False, (False,)),
                           "set_alpha_to_one": (True, (True,))})
    return {"solver": "ddim", "timestep_rules": "ddim", "timestep_spacing": config.get("timestep_spacing", "leading"),
            "steps_offset": int(config.get("steps_offset", 0)), "use_flow_sigmas": False}


def _dpmsolver_flow_sigmas(k: int, shift: float, n: int) -> list[float]:
    """DPMSolverMultistepScheduler's flow σ grid (use_flow_sigmas) for K steps, float64."""
    u = 1.0 - np.linspace(1, 1 / n, k + 1)
    return [float(s) for s in np.flip(shift * u / (1 + (shift - 1) * u))[:-1]]


def _descending(values, what: str, integer_below: int | None = None, drop_final_zero: bool = False) -> list:
    """``values`` as a list, refused unless strictly descending (and, for integer times, in [0, integer_below))."""
    values = [float(v) if integer_below is None else int(v) for v in torch.as_tensor(values).reshape(-1).tolist()]
    if drop_final_zero and len(values) > 1 and values[-1] == 0:
        values = values[:-1]
    if not values or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be a non-empty, strictly descending list, got {values}")
    if integer_below is not None and not (values[-1] >= 0 and values[0] < integer_below):
        raise ValueError(f"{what} must lie in [0, {integer_below}), got {values}")
    return values

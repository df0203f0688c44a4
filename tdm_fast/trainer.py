"""The TDM training loop: rollout, fake-score update, generator update (spec §3).

One iteration reads top to bottom like the paper: roll the student out without grad, fit the fake
score to the student's noisy samples (weighted by the importance ratio), then move the student
along the difference between the teacher's CFG score and the fake score.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from . import kernels as fused_ops
from . import objectives
from . import fsdp, runlock
from .checkpoint import remove_leftovers
from .conditions import select, to_device
from .config import TDMConfig
from .denoiser import Denoiser
from .parameterization import broadcast
from .sampling import TAU_GAP, TAU_MIN, stage_times
from .solvers import correct, multistep_coefficients
from .training.checkpoints import BOOKKEEPING, STRUCTURAL, STUDENT_STATE, Checkpointing, NonFiniteError, non_finite_tensors
from .training.compile import COMPILE_OPTIONS, COMPILE_RECOMPILE_LIMIT, compile_networks
from .training.conditions import ClassConditions, ConditionSampler, EmbeddingConditions
from .training.optim import EMA, LRSchedule, optimizer_and_schedule, skips_on_device
from .training.records import finite, json_value, short_loss, tracker_config
from .usage import write_text_atomically
from .validation import AHEAD, Validation, best_gaps, drift_report, gap_report, gap_row, log_validation, save_validation
from .kernels import reference as reference_ops

logger = logging.getLogger("tdm_fast")
# A run without validation samples reports its gap to the teacher's samplers at the end only from this
# length on: a shorter run is a smoke test, whose untrained student the report would only call untrained.
GAP_REPORT_MIN_ITERATIONS = 100

__all__ = ["BOOKKEEPING", "COMPILE_OPTIONS", "COMPILE_RECOMPILE_LIMIT", "STRUCTURAL", "STUDENT_STATE", "ClassConditions",
           "EmbeddingConditions", "LRSchedule", "NonFiniteError", "TDMTrainer", "make_student_and_fake", "non_finite_tensors"]


@dataclass
class StageDraw:
    """Per-sample stage k, its time t, stage end s and the matching time τ; with the DPM-Solver
    trajectory also the previous stage's x̂0 and the stage's multistep coefficient (else None).
    ``stage`` stays on the host, so choosing rows by it never waits for the device."""

    x_t: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    tau: torch.Tensor
    x0_prev: torch.Tensor | None = None
    coefficient: torch.Tensor | None = None
    stage: torch.Tensor | None = None


def noise_level_time(schedule, sigma_ratio: float) -> int:
    """The first time step whose σ_t/α_t reaches ``sigma_ratio`` (0 for 0); on a schedule that stays below
    it, the start of its last twentieth, so that the floor leaves an interval to draw from."""
    if sigma_ratio == 0:
        return 0
    num_t = schedule.num_train_timesteps
    alpha, sigma = schedule(torch.arange(num_t))
    return min(int((sigma / alpha < sigma_ratio).sum()), num_t - num_t // 20)


def make_student_and_fake(teacher: Denoiser, config: TDMConfig) -> tuple[Denoiser, Denoiser]:
    """Full fine-tuning: student and fake score start as copies of the teacher (spec §1)."""
    steps_set = config.steps if config.steps_conditioning else None

    def copy_of_teacher() -> Denoiser:
        model = copy.deepcopy(teacher.model).requires_grad_(True).train()
        return Denoiser(model, teacher.schedule, teacher.prediction_type, teacher.null_cond, steps_set, teacher.time_embedding)

    return copy_of_teacher(), copy_of_teacher()


class TDMTrainer(Checkpointing):
    """Distils ``teacher`` into a K-step ``student``.

    Args:
        teacher: the frozen teacher (a :class:`Denoiser` with a ``null_cond`` for CFG).
        config: a :class:`TDMConfig`.
        conditions: draws a batch of conditions, ``conditions(batch, generator)``.
        sample_shape: shape of one sample, without the batch dimension.
        output_dir: where checkpoints, ``metrics.jsonl`` and the final student go.
        student, fake: prebuilt networks (e.g. LoRA); default copies of the teacher.
        optimizer_cls: AdamW by default; e.g. bitsandbytes' AdamW8bit to save memory.
        validation: what to sample every ``config.validation_every`` iterations (a
            :class:`~tdm_fast.validation.Validation`); default: 16 draws of ``conditions`` with fixed noise.
        teacher_fingerprint: :func:`~tdm_fast.training.resume_record.weights_fingerprint` of the teacher's
            files, recorded in every checkpoint; a resume with another teacher is then refused.
    """

    def __init__(
        self,
        teacher: Denoiser,
        config: TDMConfig,
        conditions: ConditionSampler,
        sample_shape: tuple[int, ...],
        output_dir: str | Path | None = None,
        student: Denoiser | None = None,
        fake: Denoiser | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
        optimizer_cls=torch.optim.AdamW,
        validation: Validation | None = None,
        teacher_fingerprint: str | None = None,
    ):
        if teacher.null_cond is None and config.cfg_scale != 1.0:
            raise ValueError("the teacher has no null_cond, so cfg_scale must be 1")
        self.config = config
        if config.report_to and output_dir is None and accelerator is None:
            raise ValueError(f"report_to={config.report_to!r} needs an output_dir for the tracker's files")
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision, log_with=config.report_to,
                                                      project_dir=output_dir)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # accelerate's DeepSpeed prepare() builds one engine with one optimizer for all the models it is
            # given, which would merge the student's and the fake score's updates
            raise ValueError("DeepSpeed is not supported: it would train student and fake score as one engine with one "
                             "optimizer. Use multi-GPU data parallel instead (accelerate launch --multi_gpu)")
        self.device = self.accelerator.device
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if student is None or fake is None:
            student, fake = make_student_and_fake(teacher, config)
        sharding = fsdp.plugin(self.accelerator)
        self.fsdp = sharding is not None
        if self.fsdp:
            fsdp.check_supported(sharding, self.accelerator)
            self._export_template = fsdp.meta_template(student)
            for network in (self.teacher, student, fake):
                network.to(self.device)
            fsdp.shard_networks((self.teacher, student, fake), sharding, self.device, self.accelerator.num_processes)
        self.conditions = conditions
        self.sample_shape = tuple(sample_shape)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.progress = progress
        if config.validation_every and validation is None:
            validation = Validation.from_conditions(conditions, sample_shape)
        self.validation = validation
        self._validated = (None, {})  # (step, metrics) of the last validation
        self._gap_history = []  # gap_row of every validation of the run, resumed ones included (validation/gap.json)
        self.ops = fused_ops if config.kernels == "fused" else reference_ops
        self.tau_floor = noise_level_time(teacher.schedule, config.tau_min_sigma)
        self.times = {k: torch.tensor(stage_times(k, config.total_steps, teacher.schedule.num_train_timesteps)) for k in config.steps}
        self.coefficients = {k: multistep_coefficients(teacher.schedule, self.times[k].tolist(), config.student_solver)
                             for k in config.steps}

        student_params = [p for p in student.parameters() if p.requires_grad]
        opt_g, self.sched_g = optimizer_and_schedule(optimizer_cls, student, config.generator_lr, config, self.device)
        opt_f, self.sched_f = optimizer_and_schedule(optimizer_cls, fake, config.fake_lr, config, self.device)
        if self.fsdp:  # FSDP reduces the gradients itself: no DDP wrapper
            self.student, self.fake, self.opt_g, self.opt_f = student, fake, opt_g, opt_f
        else:
            (self.student, self.fake, self.opt_g, self.opt_f) = self.accelerator.prepare(
                student.to(self.device), fake.to(self.device), opt_g, opt_f
            )
        self._check_sample_shape(conditions)
        self.student_core: Denoiser = self.accelerator.unwrap_model(self.student)
        self.fake_core: Denoiser = self.accelerator.unwrap_model(self.fake)
        self.ema = EMA(student_params, config.ema_decay) if config.ema_decay else None

        rank = self.accelerator.process_index
        # Noise and conditions differ per rank; K is shared so all ranks run the same graph.
        self.rng = torch.Generator().manual_seed(config.seed * 7919 + rank)
        self.steps_rng = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed_s = 0.0  # training time of the run, over every resume (checkpointed)
        self.consecutive_skips = 0
        self.skipped_updates = 0
        self._warned_unsaveable = False
        self.teacher_fingerprint = teacher_fingerprint
        if config.compile:
            compile_networks(self)

    @torch.no_grad()
    def _check_sample_shape(self, conditions: ConditionSampler) -> None:
        """One teacher call on two samples, so a wrong shape fails here with a readable message."""
        cond = to_device(conditions(2, torch.Generator().manual_seed(0)), self.device)
        x = torch.zeros((2, *self.sample_shape), device=self.device)
        try:
            with self.accelerator.autocast():
                self.teacher(x, torch.full((2,), TAU_MIN, device=self.device), cond)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"sample_shape {self.sample_shape} or the conditions do not fit the teacher: {exc}") from exc

    # -- the three phases of one iteration --------------------------------------------------------
    def _steps_arg(self, k: int):
        return k if self.config.steps_conditioning else None

    @torch.no_grad()
    def rollout(self, z: torch.Tensor, cond, k: int) -> torch.Tensor:
        """Runs the student's K stages from noise without grad; returns (3K-2, B, ...): the states
        x_{t_0..t_{K-1}}, then the student's x̂0_{t_0..t_{K-2}} and ε̂_{t_0..t_{K-2}} from which it jumped.

        The predictions are kept for the fake-score update, which reads them instead of running the
        student again (:meth:`student_prediction`). With a multistep solver (``student_solver="dpmsolver"``,
        K >= 3) a stage's state is the pair (x_{t_i}, x̂0_{t_{i-1}}): the x̂0s are also its second half."""
        times, coefficients = self.times[k].tolist(), self.coefficients[k]
        x, states, predictions, noises = z, [], [], []
        with self.accelerator.autocast():
            for i, t in enumerate(times):
                states.append(x)
                if i + 1 == len(times):
                    break
                x0, eps = self.student_core(x, t, cond, self._steps_arg(k))
                x0, eps = x0.float(), eps.float()
                alpha, sigma = self.teacher.schedule(torch.full((x.shape[0],), times[i + 1], device=x.device))
                if coefficients[i]:
                    alpha_t, sigma_t = self.teacher.schedule(torch.full((x.shape[0],), t, device=x.device))
                    x = self.ops.ddim_jump(*correct(x0, eps, predictions[-1], coefficients[i], broadcast(alpha_t, x0),
                                                    broadcast(sigma_t, x0)), alpha, sigma)
                else:
                    x = self.ops.ddim_jump(x0, eps, alpha, sigma)
                predictions.append(x0)
                noises.append(eps)
        return torch.stack(states + predictions + noises)

    def draw_stage(self, trajectory: torch.Tensor, k: int) -> StageDraw:
        """Per sample: a stage, its start t, its end s, and τ in the stage's own interval (spec §3.2)."""
        b = trajectory.shape[1]
        times = self.times[k]
        stage = torch.randint(0, k, (b,), generator=self.rng)
        t = times[stage]
        s = torch.where(stage + 1 < k, times[(stage + 1).clamp(max=k - 1)] + 1, torch.zeros_like(t))
        # τ = s would be the identity transition (β = 0), where the density ratio is undefined
        low = (s + 1).clamp(min=TAU_MIN)
        num_t = self.teacher.schedule.num_train_timesteps
        high = t - TAU_GAP if self.config.tau_interval == "disjoint" else torch.full_like(t, num_t)
        if self.tau_floor:
            low = low.clamp(min=self.tau_floor)
            high = torch.maximum(high, low + num_t // 20).clamp(max=num_t)
        tau = low + (torch.rand(b, generator=self.rng) * (high - low)).long()
        rows = torch.arange(b, device=trajectory.device)
        x_t = trajectory[stage.to(trajectory.device), rows]
        if not any(self.coefficients[k]):
            return StageDraw(x_t, self._upload(t), self._upload(s), self._upload(tau), stage=stage)
        # stage 0 has no previous prediction; its coefficient is 0, so x̂0_{t_0} stands in
        x0_prev = trajectory[(k + (stage - 1).clamp(min=0)).to(trajectory.device), rows]
        return StageDraw(x_t, self._upload(t), self._upload(s), self._upload(tau), x0_prev,
                         self._upload(torch.tensor(self.coefficients[k])[stage]), stage)

    @torch.no_grad()
    def student_prediction(self, trajectory: torch.Tensor, cond, draw: StageDraw, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's (x̂0, ε̂) at the drawn x_t, without grad, in float32: what :meth:`rollout` computed
        at the stages it jumped from is read back; only the samples drawn at the last stage, where the
        rollout stops, run through the student (a gathered subset: equal to a full-batch call up to the
        last bits of float32). The student's weights do not change between the rollout and the fake-score
        update, so this is the same function of the same inputs.

        Under FSDP every process runs the student on its whole batch: a sharded network gathers its
        weights in each call, so all processes must make the same calls whatever their draws."""
        if self.fsdp or k == 1:
            with self.accelerator.autocast():
                x0, eps = self.student_core(draw.x_t, draw.t, cond, self._steps_arg(k))
            return x0.float(), eps.float()
        device = trajectory.device
        rows = torch.arange(trajectory.shape[1])
        stage = draw.stage.clamp(max=k - 2)  # the last stage's rows are overwritten below
        x0 = trajectory[(k + stage).to(device), rows.to(device)]
        eps = trajectory[(2 * k - 1 + stage).to(device), rows.to(device)]
        last = rows[draw.stage == k - 1]
        if len(last):
            index = self._upload(last)
            with self.accelerator.autocast(), self._eager_if_compiled():
                x0_last, eps_last = self.student_core(draw.x_t[index], draw.t[index], select(cond, index), self._steps_arg(k))
            x0.index_copy_(0, index, x0_last.float())
            eps.index_copy_(0, index, eps_last.float())
        return x0, eps

    def _eager_if_compiled(self):
        """Compiled networks run eagerly in the block: the last stage's subset changes size every iteration,
        and would recompile the networks per size, then run a dynamic-shape graph that costs about a
        full-batch forward on a CPU (issue 15's breakdown); eager costs the subset's share."""
        return torch.compiler.set_stance("force_eager") if self.config.compile else nullcontext()

    def stage_output(self, x0: torch.Tensor, eps: torch.Tensor, draw: StageDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x̂0, ε̂) from which the student's solver jumps at the drawn stage: the student's own for
        DDIM, DPM-Solver++(2M)'s corrected pair otherwise (docs/student_solver.md). The stage's sample
        x_s = α_s x̂0 + σ_s ε̂ is then the solver's state, and x̂0 the data it is matched as."""
        if draw.x0_prev is None:
            return x0, eps
        alpha_t, sigma_t = self.teacher.schedule(draw.t)
        return correct(x0, eps, draw.x0_prev.to(x0.dtype), broadcast(draw.coefficient, x0), broadcast(alpha_t, x0),
                       broadcast(sigma_t, x0))

    def match(self, x0: torch.Tensor, eps: torch.Tensor, draw: StageDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy-sample matching (spec §4), or the clean-sample ablation, from the student's prediction at
        the drawn stage (put through :meth:`stage_output` here); returns x_τ and log w."""
        x0, eps = self.stage_output(x0, eps, draw)
        schedule = self.teacher.schedule
        z = self._upload(torch.randn(x0.shape, generator=self.rng)).to(x0.dtype)
        alpha_tau, sigma_tau = schedule(draw.tau)
        if self.config.matching == "clean":
            x_tau = self.ops.ddim_jump(x0, z, alpha_tau, sigma_tau)
            log_w = torch.zeros(x0.shape[0], device=self.device)
        else:
            alpha_s, sigma_s = schedule(draw.s)
            x_tau, log_w = self.ops.renoise(x0, eps, z, alpha_s, sigma_s, alpha_tau, sigma_tau)
        if not self.config.importance_sampling:
            log_w = torch.zeros_like(log_w)
        return x_tau, log_w

    @staticmethod
    def _micro_batches(batches):
        """(trajectory, cond, is_last) per micro-batch: gradients are all-reduced on the last only."""
        for i, (trajectory, cond) in enumerate(batches):
            yield trajectory, cond, i + 1 == len(batches)

    def _sync_context(self, model, last: bool):
        if last:
            return nullcontext()
        return fsdp.no_gradient_sync(fsdp.unit(model)) if self.fsdp else self.accelerator.no_sync(model)

    def _clip(self, model, max_norm: float) -> torch.Tensor:
        if self.fsdp:
            fsdp.all_reduce_replicated(model.parameters(), self.accelerator)
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if fsdp.is_sharded(norm) else norm

    def fake_score_loss(self, batches, k: int, backward: bool = True) -> torch.Tensor:
        """The fake score's loss, the mean over the micro-batches (a device tensor); with ``backward`` its
        gradients are accumulated into the fake score's parameters, micro-batch by micro-batch."""
        total = 0.0
        for trajectory, cond, last in self._micro_batches(batches):
            draw = self.draw_stage(trajectory, k)
            x0, eps = self.student_prediction(trajectory, cond, draw, k)
            x_tau, log_w = self.match(x0, eps, draw)
            target, _ = self.stage_output(x0, eps, draw)  # the x̂0 that x_τ was matched as
            with self._sync_context(self.fake, last):
                with self.accelerator.autocast():
                    d_fake, _ = self.fake(x_tau, draw.tau, cond, self._steps_arg(k))
                loss = self.ops.fake_score_loss(d_fake.float(), target, self.teacher.schedule.snr(draw.tau), log_w, self.config.snr_cap)
                loss = loss / len(batches)
                if backward:
                    self.accelerator.backward(loss)
            total = total + loss.detach()
        return total

    def fake_score_update(self, batches, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of the fake score over the micro-batches; (their mean loss, skipped flag) as
        device tensors."""
        total = self.fake_score_loss(batches, k)
        # the norm only decides whether the step is safe: the fake score is not clipped (authors' code)
        return total, self._apply_update(self.opt_f, self.sched_f, total, self._clip(self.fake, math.inf))

    def _apply_update(self, optimizer, scheduler, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Steps ``optimizer`` unless the loss or the gradient norm is non-finite; returns the skipped flag
        (a 0-d float tensor on the device, 1 = skipped). The LR schedule counts iterations, skipped or not.

        A fused Adam/AdamW skips on the device (see :func:`skips_on_device`): the host never waits.
        Other optimizers make the host read the flag. The gradient norm is taken after the gradients
        were all-reduced, and the flag is all-reduced, so every process decides the same. Under fp16
        the grad scaler owns overflowing gradients (it skips those steps and lowers its scale), so only
        a non-finite loss is skipped here.
        """
        bad = ~torch.isfinite(torch.as_tensor(loss, device=self.device))
        if self.accelerator.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm.to(self.device))
        bad = bad.float().reshape(())
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.reshape(1), reduction="sum").clamp(max=1.0).reshape(())
        if self.accelerator.scaler is None and skips_on_device(optimizer):
            inner = getattr(optimizer, "optimizer", optimizer)
            inner.grad_scale, inner.found_inf = None, bad
            optimizer.step()
        elif not bool(bad):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return bad

    def guidance(self, d_cond: torch.Tensor, d_uncond: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The generator loss's teacher pair and CFG scale. With ``guidance_min_sigma`` / ``guidance_max_sigma``
        the guided target applies only to the samples matched at σ_τ/α_τ between them, the conditional teacher
        to the rest: those rows get the guided D_cfg precomputed as their ``d_cond`` and the loss runs at scale 1.
        The lower bound is an ablation of the drift study (docs/stability.md): on the built-in teachers it made
        the guided 4-step students drift faster toward the unguided distribution. The upper one keeps the top
        of the trajectory, where the guided sampler's marginal is still nearly the noise, from being sharpened
        (docs/t2i_demo.md)."""
        scale, low, high = self.config.cfg_scale, self.config.guidance_min_sigma, self.config.guidance_max_sigma
        if scale == 1 or (low == 0 and high is None):
            return d_cond, d_uncond, scale
        alpha, sigma = self.teacher.schedule(tau)
        level = sigma / alpha
        guided = (level > low) & (level < high) if high is not None else level > low
        guided = broadcast(guided, d_cond)
        return torch.where(guided, torch.lerp(d_uncond, d_cond, scale), d_cond), d_uncond, 1.0

    def generator_update(self, batches, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step of the student over the micro-batches; (loss, grad norm, skipped flag) as
        device tensors."""
        total = 0.0
        # The Fisher loss backpropagates through the teacher and the fake score at x_τ (docs/fisher.md);
        # the fake's weights are frozen through the backward so that only the student collects gradients.
        fisher = self.config.objective == "fisher"
        for trajectory, cond, last in self._micro_batches(batches):
            draw = self.draw_stage(trajectory, k)
            with self._sync_context(self.student, last), objectives.frozen(self.fake_core) if fisher else nullcontext():
                with self.accelerator.autocast():
                    x0, eps = self.student(draw.x_t, draw.t, cond, self._steps_arg(k))
                x0 = x0.float()
                x_tau, _ = self.match(x0.detach(), eps.detach().float(), draw)
                if fisher:  # written on the data x_τ was matched as: x̂0, or DPM-Solver's D (docs/student_solver.md)
                    x0 = self.stage_output(x0, eps.float(), draw)[0]
                    x_tau = objectives.with_x0_path(x_tau, x0, self.teacher.schedule(draw.tau)[0])
                with torch.set_grad_enabled(fisher), self.accelerator.autocast():
                    (d_cond, _), (d_uncond, _) = self.teacher.cond_uncond(x_tau, draw.tau, cond)
                    d_fake, _ = self.fake_core(x_tau, draw.tau, cond, self._steps_arg(k))
                d_cond, d_uncond, cfg_scale = self.guidance(d_cond.float(), d_uncond.float(), draw.tau)
                if fisher:
                    loss = objectives.fisher_generator_loss(x0, d_cond, d_uncond, d_fake.float(), cfg_scale,
                                                            self.config.normalize)
                else:
                    loss = self.ops.tdm_generator_loss(x0, d_cond, d_uncond, d_fake.float(), cfg_scale,
                                                       self.config.huber_c, self.config.normalize)
                loss = loss / len(batches)
                self.accelerator.backward(loss)
            total = total + loss.detach()
        grad_norm = self._clip(self.student, self.config.max_grad_norm)
        skipped = self._apply_update(self.opt_g, self.sched_g, total, grad_norm)
        if self.ema is not None:
            self.ema.update(skipped)
        return total, grad_norm, skipped

    def train_step(self) -> dict:
        """One TDM iteration; returns its losses (reading them makes the host wait for the device)."""
        record = self._records([self._iterate()])[0]
        self._count_skips(record["skipped_updates"], record["step"])
        return record

    def _iterate(self) -> dict:
        """One TDM iteration, its losses, gradient norm and skipped flags left on the device."""
        config = self.config
        k = config.steps[self._draw_steps_index()]
        batches = []  # gradient_accumulation_steps micro-batches of batch_size, each rolled out once
        for _ in range(config.gradient_accumulation_steps):
            cond = to_device(self.conditions(config.batch_size, self.rng), self.device)
            z = self._upload(torch.randn((config.batch_size, *self.sample_shape), generator=self.rng))
            batches.append((self.rollout(z, cond, k), cond))
        fake = [self.fake_score_update(batches, k) for _ in range(config.fake_updates)]
        generator = self.generator_update(batches, k)
        self.step += 1
        return {"step": self.step, "steps": k, "fake": fake, "generator": generator}

    def _draw_steps_index(self) -> int:
        """The index of this iteration's K, from the host generator that every process seeds alike: all
        processes draw the same K."""
        weights = self.config.steps_weights
        if weights is None:
            return torch.randint(0, len(self.config.steps), (1,), generator=self.steps_rng).tolist()[0]
        return torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=self.steps_rng).tolist()[0]

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host-drawn tensor onto the device without making the host wait (pinned, asynchronous copy)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _records(self, pending: list[dict]) -> list[dict]:
        """The host-side records of iterations run by :meth:`_iterate`, read from the device in one go."""
        scalars = [v for it in pending for v in [*(x for pair in it["fake"] for x in pair), *it["generator"]]]
        values = iter(torch.stack([v.detach().float().reshape(()) for v in scalars]).tolist()) if scalars else iter(())
        records = []
        for it in pending:
            fake = [(next(values), next(values)) for _ in it["fake"]]
            generator_loss, grad_norm, generator_skipped = next(values), next(values), next(values)
            applied = [loss for loss, skipped in fake if not skipped]
            skipped = len(fake) - len(applied) + int(generator_skipped > 0)
            record = {"step": it["step"], "steps": it["steps"], "fake_loss": sum(applied) / len(applied) if applied else None,
                      "generator_loss": None if generator_skipped else generator_loss, "grad_norm": json_value(grad_norm),
                      "skipped_updates": skipped}
            record.update({k: v for k, v in it.items() if k not in ("step", "steps", "fake", "generator")})
            records.append(record)
        return records

    def _count_skips(self, skipped: int, step: int) -> None:
        """Skipped updates are counted; ``max_nonfinite_skips`` iterations in a row with one stop the run."""
        self.skipped_updates += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            warnings.warn(f"iteration {step}: {skipped} update(s) skipped (non-finite loss or gradient norm)")
        if self.consecutive_skips >= self.config.max_nonfinite_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} iterations in a row had a non-finite loss or gradient norm (the last at step "
                f"{step}); stopped without writing them. The teacher's outputs, the learning rates or the data "
                "are the usual causes; the last checkpoint holds the last finite weights")

    # -- the loop --------------------------------------------------------------------------------
    def train(self, iterations: int | None = None, callback: Callable[["TDMTrainer", dict], None] | None = None) -> list[dict]:
        """Runs until ``iterations`` (default ``config.iterations``) in total, checkpointing as configured."""
        total = iterations if iterations is not None else self.config.iterations
        history = []
        log_file = None
        writer = self.output_dir is not None and self.accelerator.is_main_process
        if writer:
            runlock.acquire(self.output_dir)
        bar = tqdm(total=total, initial=self.step, desc="TDM", disable=not (self.progress and self.accelerator.is_main_process))
        start = time.perf_counter() - self.elapsed_s  # a resumed run's clock goes on
        if self.config.report_to:
            self.accelerator.init_trackers("tdm-fast", config=tracker_config(self.config))
        try:
            if writer:
                log_file = self._open_metrics()
                self._gap_history = self._read_gap_history()
            if self.output_dir is not None and self.step >= total and hasattr(self.student_core.model, "save_pretrained"):
                # a resumed, finished run whose final save was cut short
                if not self.student_is_current():
                    self.save_student(self.output_dir / "student")
                if writer:
                    remove_leftovers(self.output_dir / "student")
            pending = []  # iterations whose losses are still on the device
            first_step = self.step
            while self.step < total:
                pending.append(self._iterate())
                self.elapsed_s = time.perf_counter() - start
                pending[-1]["elapsed_s"] = self.elapsed_s
                bar.update(1)
                every = self.config.checkpoint_every
                validate = self.validation is not None and self.config.validation_every and self.step % self.config.validation_every == 0
                checkpoint = self.output_dir is not None and ((every and self.step % every == 0) or self.step == total)
                # the host reads the device only here: at log steps, or where a callback, validation or a
                # checkpoint needs the iteration's outcome (a checkpoint after a run of skips must not be written)
                if not (callback or validate or checkpoint or self.step % self.config.log_every == 0 or self.step == total):
                    continue
                for record in self._records(pending):
                    history.append(record)
                    if record["step"] % self.config.log_every == 0 or record["step"] == total or record["skipped_updates"]:
                        bar.set_postfix(fake=short_loss(record["fake_loss"]), gen=short_loss(record["generator_loss"]), K=record["steps"])
                        if log_file:
                            log_file.write(json.dumps({k: json_value(v) for k, v in record.items()}, allow_nan=False) + "\n")
                            log_file.flush()
                        if self.config.report_to:
                            self.accelerator.log(self._tracker_values(record), step=record["step"])
                    self._count_skips(record["skipped_updates"], record["step"])
                    if callback is not None:
                        callback(self, record)
                pending = []
                if validate:
                    self.validate()
                if checkpoint:
                    self.save_checkpoint()
            if self.step > first_step and self.output_dir is not None and (self.validation or total >= GAP_REPORT_MIN_ITERATIONS):
                bar.close()  # the report's lines below the finished bar
                self.report_baseline_gap()
        finally:
            bar.close()
            if log_file:
                log_file.close()
            if self.config.report_to:
                self.accelerator.end_training()
            if writer:
                runlock.release(self.output_dir)
        return history

    def _tracker_values(self, record: dict) -> dict:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and finite(v) and k != "step"}
        values["lr/generator"] = self.opt_g.param_groups[0]["lr"]
        values["lr/fake"] = self.opt_f.param_groups[0]["lr"]
        if record.get("elapsed_s"):
            values["samples_per_s"] = self.config.batch_size * self.config.gradient_accumulation_steps * \
                self.accelerator.num_processes * record["step"] / record["elapsed_s"]  # both over every resume
        return values

    def validate(self) -> dict:
        """Samples the validation set at every K (main process): grid under ``<output_dir>/validation/``,
        images and metrics to the trackers; returns the metrics."""
        if not (self.accelerator.is_main_process or self.fsdp):  # sharded networks sample on every process
            return {}
        with self.ema_weights() as student, self.accelerator.autocast():
            images, metrics = self.validation.run(student, self.config.steps, self.config.total_steps,
                                                  self.config.student_solver, self.device, self.teacher, self.config.cfg_scale)
        self._validated = (self.step, metrics)  # every process: a sharded report at this step must not sample again
        if not self.accelerator.is_main_process:
            return {}
        has_gaps = self._log_gaps(metrics, f"validation at step {self.step}")
        grids = {}
        if self.output_dir is not None:
            if has_gaps:
                self._gap_summary(metrics)
            grids = save_validation(images, self.output_dir / "validation" / f"step-{self.step:08d}.png", self.step,
                                    self.validation.captions)
        if self.config.report_to:
            log_validation(self.accelerator, grids, metrics, self.step)
        return metrics

    def report_baseline_gap(self) -> dict:
        """The end of a run: how far each K is from the teacher's 50-step samples against the best NFE-matched
        teacher sampler (:mod:`tdm_fast.validation`), logged with a warning for a K that is not ahead, and
        written to ``<output_dir>/validation/gap.json``. Measured on the validation set, or on 8 draws of the
        run's conditions where the run has none."""
        step, metrics = self._validated
        if step != self.step:
            if not (self.accelerator.is_main_process or self.fsdp):
                return {}
            validation = self.validation or Validation.from_conditions(self.conditions, self.sample_shape, count=8)
            with self.ema_weights() as student, self.accelerator.autocast():
                _, metrics = validation.run(student, self.config.steps, self.config.total_steps, self.config.student_solver,
                                            self.device, self.teacher, self.config.cfg_scale)
            self.validation = self.validation or validation  # keeps the teacher's side for a later call
            if self.accelerator.is_main_process:
                self._log_gaps(metrics, f"end of run (step {self.step})")  # else the validation of this step said it
        if not self.accelerator.is_main_process:
            return {}
        return self._gap_summary(metrics)

    def _log_gaps(self, metrics: dict, when: str) -> bool:
        """Logs each K's gap: a warning for a K not ahead of its baseline, and for a K drifting away from its best
        gap of the run (kept in ``validation/gap.json``, so that a resumed run compares with the gaps before it).
        False where the metrics hold no gaps (a run without a teacher)."""
        for k, line in zip(sorted(self.config.steps), gap_report(metrics, self.config.steps, self.validation.last_baselines)):
            behind = metrics.get(f"validation/gap_k{k}", 0.0) >= AHEAD
            (logger.warning if behind else logger.info)("%s: %s", when, line)
        row = gap_row(self.step, metrics, self.config.steps)
        if len(row) == 1:
            return False
        self._gap_history = [r for r in self._gap_history if r["step"] < self.step] + [row]
        for line in drift_report(self._gap_history, self.config.steps):
            logger.warning("%s: %s", when, line)
        return True

    def _gap_summary(self, metrics: dict) -> dict:
        """``validation/gap.json``: the gaps of this step, the baselines, each K's best gap of the run and the history."""
        gaps = {key.split("/", 1)[1]: value for key, value in metrics.items() if key.split("/", 1)[1].startswith(("gap_", "distance_", "baseline_"))}
        gaps["baselines"] = {f"K={k}": name for k, (name, _) in self.validation.last_baselines.items()}
        gaps["best"] = {f"K={k}": {"step": step, "gap": gap} for k, (step, gap) in best_gaps(self._gap_history, self.config.steps).items()}
        gaps["history"] = self._gap_history
        (self.output_dir / "validation").mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.output_dir / "validation" / "gap.json", json.dumps({"step": self.step, **gaps}, indent=2))
        return gaps

    def _read_gap_history(self) -> list[dict]:
        """The gap history of ``validation/gap.json`` up to the current (resumed) step; empty for a new run."""
        path = self.output_dir / "validation" / "gap.json"
        try:
            history = json.loads(path.read_text()).get("history", [])
        except (OSError, ValueError, AttributeError):
            return []  # none yet, or one a kill tore: the drift check starts afresh
        return [row for row in history if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step
                and all(isinstance(value, (int, float)) for value in row.values())]

    def _open_metrics(self):
        """``metrics.jsonl`` for appending, first cut back to the rows up to the current (resumed) step, so
        that the steps a killed run logged after its last checkpoint do not appear twice."""
        path = self.output_dir / "metrics.jsonl"
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                    kept.append(line + "\n")
            write_text_atomically(path, "".join(kept))
        return open(path, "a")


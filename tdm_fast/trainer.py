"""The TDM training loop: rollout, fake-score update, generator update (spec §3).

One iteration reads top to bottom like the paper: roll the student out without grad, fit the fake
score to the student's noisy samples (weighted by the importance ratio), then move the student
along the difference between the teacher's CFG score and the fake score.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import kernels as fused_ops
from .checkpoint import commit_checkpoint, load_checkpoint, write_rank_file, write_state
from .conditions import to_device
from .config import TDMConfig
from .denoiser import Denoiser
from .sampling import TAU_GAP, TAU_MIN, stage_times
from .kernels import reference as reference_ops

ConditionSampler = Callable[[int, torch.Generator], object]


class ClassConditions:
    """Uniform class labels 0..num_classes-1 (the null class is excluded)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (batch,), generator=generator)


class EmbeddingConditions:
    """Rows drawn uniformly from precomputed condition embeddings (a tensor or a dict of tensors)."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        first = next(iter(embeddings.values())) if isinstance(embeddings, dict) else embeddings
        self.count = first.shape[0]

    def __call__(self, batch: int, generator: torch.Generator):
        idx = torch.randint(0, self.count, (batch,), generator=generator)
        if isinstance(self.embeddings, dict):
            return {k: v[idx] for k, v in self.embeddings.items()}
        return self.embeddings[idx]


class Warmup:
    """Linear learning-rate warm-up, then constant (a class, so its state checkpoints as plain data)."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, step: int) -> float:
        return 1.0 if self.steps <= 0 else min(1.0, (step + 1) / self.steps)


class EMA:
    """Exponential moving average of the student's trainable weights, kept in float32."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))


@dataclass
class StageDraw:
    """Per-sample stage k, its time t, stage end s and the matching time τ."""

    x_t: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    tau: torch.Tensor


def make_student_and_fake(teacher: Denoiser, config: TDMConfig) -> tuple[Denoiser, Denoiser]:
    """Full fine-tuning: student and fake score start as copies of the teacher (spec §1)."""
    steps_set = config.steps if config.steps_conditioning else None

    def copy_of_teacher() -> Denoiser:
        model = copy.deepcopy(teacher.model).requires_grad_(True).train()
        return Denoiser(model, teacher.schedule, teacher.prediction_type, teacher.null_cond, steps_set, teacher.time_embedding)

    return copy_of_teacher(), copy_of_teacher()


def _param_groups(denoiser: Denoiser, lr: float, steps_lr_ratio: float) -> list[dict]:
    """The trainable parameters, with the K embedding (if any) in its own group at ``lr * steps_lr_ratio``."""
    steps = [p for n, p in denoiser.named_parameters() if p.requires_grad and n.startswith("steps_embedding.")]
    rest = [p for n, p in denoiser.named_parameters() if p.requires_grad and not n.startswith("steps_embedding.")]
    return [{"params": rest}] + ([{"params": steps, "lr": lr * steps_lr_ratio}] if steps else [])


class TDMTrainer:
    """Distils ``teacher`` into a K-step ``student``.

    Args:
        teacher: the frozen teacher (a :class:`Denoiser` with a ``null_cond`` for CFG).
        config: a :class:`TDMConfig`.
        conditions: draws a batch of conditions, ``conditions(batch, generator)``.
        sample_shape: shape of one sample, without the batch dimension.
        output_dir: where checkpoints, ``metrics.jsonl`` and the final student go.
        student, fake: prebuilt networks (e.g. LoRA); default copies of the teacher.
        optimizer_cls: AdamW by default; e.g. bitsandbytes' AdamW8bit to save memory.
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
    ):
        if teacher.null_cond is None and config.cfg_scale != 1.0:
            raise ValueError("the teacher has no null_cond, so cfg_scale must be 1")
        self.config = config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
        self.device = self.accelerator.device
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if student is None or fake is None:
            student, fake = make_student_and_fake(teacher, config)
        self.conditions = conditions
        self.sample_shape = tuple(sample_shape)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.progress = progress
        self.ops = fused_ops if config.kernels == "fused" else reference_ops
        self.times = {k: torch.tensor(stage_times(k, config.total_steps, teacher.schedule.num_train_timesteps)) for k in config.steps}

        student_params = [p for p in student.parameters() if p.requires_grad]
        betas = (config.adam_beta1, config.adam_beta2)
        opt_g = optimizer_cls(_param_groups(student, config.generator_lr, config.steps_embedding_lr_ratio),
                              lr=config.generator_lr, betas=betas, weight_decay=config.weight_decay)
        opt_f = optimizer_cls(_param_groups(fake, config.fake_lr, config.steps_embedding_lr_ratio),
                              lr=config.fake_lr, betas=betas, weight_decay=config.weight_decay)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, Warmup(config.warmup_steps))
        sched_f = torch.optim.lr_scheduler.LambdaLR(opt_f, Warmup(config.warmup_steps))
        (self.student, self.fake, self.opt_g, self.opt_f, self.sched_g, self.sched_f) = self.accelerator.prepare(
            student.to(self.device), fake.to(self.device), opt_g, opt_f, sched_g, sched_f
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
        self._warned_unsaveable = False

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
        """Runs the student's K stages from noise without grad; returns x_{t_0..t_{K-1}} stacked (K, B, ...)."""
        times = self.times[k].tolist()
        x, states = z, []
        with self.accelerator.autocast():
            for i, t in enumerate(times):
                states.append(x)
                if i + 1 == len(times):
                    break
                x0, eps = self.student_core(x, t, cond, self._steps_arg(k))
                alpha, sigma = self.teacher.schedule(torch.full((x.shape[0],), times[i + 1], device=x.device))
                x = self.ops.ddim_jump(x0.float(), eps.float(), alpha, sigma)
        return torch.stack(states)

    def draw_stage(self, trajectory: torch.Tensor, k: int) -> StageDraw:
        """Per sample: a stage, its start t, its end s, and τ in the stage's own interval (spec §3.2)."""
        b = trajectory.shape[1]
        times = self.times[k]
        stage = torch.randint(0, k, (b,), generator=self.rng)
        t = times[stage]
        s = torch.where(stage + 1 < k, times[(stage + 1).clamp(max=k - 1)] + 1, torch.zeros_like(t))
        # τ = s would be the identity transition (β = 0), where the density ratio is undefined
        low = (s + 1).clamp(min=TAU_MIN)
        high = t - TAU_GAP if self.config.tau_interval == "disjoint" else torch.full_like(t, self.teacher.schedule.num_train_timesteps)
        tau = low + (torch.rand(b, generator=self.rng) * (high - low)).long()
        x_t = trajectory[stage.to(trajectory.device), torch.arange(b, device=trajectory.device)]
        return StageDraw(x_t, t.to(self.device), s.to(self.device), tau.to(self.device))

    def match(self, x0: torch.Tensor, eps: torch.Tensor, draw: StageDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy-sample matching (spec §4), or the clean-sample ablation; returns x_τ and log w."""
        schedule = self.teacher.schedule
        z = torch.randn(x0.shape, generator=self.rng).to(self.device, x0.dtype)
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

    def fake_score_update(self, trajectory, cond, k: int) -> float:
        draw = self.draw_stage(trajectory, k)
        with torch.no_grad(), self.accelerator.autocast():
            x0, eps = self.student_core(draw.x_t, draw.t, cond, self._steps_arg(k))
        x_tau, log_w = self.match(x0.float(), eps.float(), draw)
        with self.accelerator.autocast():
            d_fake, _ = self.fake(x_tau, draw.tau, cond, self._steps_arg(k))
        loss = self.ops.fake_score_loss(d_fake.float(), x0.float(), self.teacher.schedule.snr(draw.tau), log_w, self.config.snr_cap)
        self.accelerator.backward(loss)
        self.opt_f.step()
        self.sched_f.step()
        self.opt_f.zero_grad(set_to_none=True)
        return loss.item()

    def generator_update(self, trajectory, cond, k: int) -> tuple[float, float]:
        draw = self.draw_stage(trajectory, k)
        with self.accelerator.autocast():
            x0, eps = self.student(draw.x_t, draw.t, cond, self._steps_arg(k))
        x0 = x0.float()
        x_tau, _ = self.match(x0.detach(), eps.detach().float(), draw)
        with torch.no_grad(), self.accelerator.autocast():
            (d_cond, _), (d_uncond, _) = self.teacher.cond_uncond(x_tau, draw.tau, cond)
            d_fake, _ = self.fake_core(x_tau, draw.tau, cond, self._steps_arg(k))
        loss = self.ops.tdm_generator_loss(
            x0, d_cond.float(), d_uncond.float(), d_fake.float(), self.config.cfg_scale, self.config.huber_c, self.config.normalize
        )
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm)
        self.opt_g.step()
        self.sched_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return loss.item(), float(grad_norm)

    def train_step(self) -> dict:
        """One TDM iteration; returns its losses."""
        config = self.config
        k = config.steps[int(torch.randint(0, len(config.steps), (1,), generator=self.steps_rng))]
        cond = to_device(self.conditions(config.batch_size, self.rng), self.device)
        z = torch.randn((config.batch_size, *self.sample_shape), generator=self.rng).to(self.device)
        trajectory = self.rollout(z, cond, k)
        fake_loss = sum(self.fake_score_update(trajectory, cond, k) for _ in range(config.fake_updates)) / config.fake_updates
        generator_loss, grad_norm = self.generator_update(trajectory, cond, k)
        self.step += 1
        return {"step": self.step, "steps": k, "fake_loss": fake_loss, "generator_loss": generator_loss, "grad_norm": grad_norm}

    # -- the loop --------------------------------------------------------------------------------
    def train(self, iterations: int | None = None, callback: Callable[["TDMTrainer", dict], None] | None = None) -> list[dict]:
        """Runs until ``iterations`` (default ``config.iterations``) in total, checkpointing as configured."""
        total = iterations if iterations is not None else self.config.iterations
        history = []
        log_file = None
        if self.output_dir is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.output_dir / "metrics.jsonl", "a")
        bar = tqdm(total=total, initial=self.step, desc="TDM", disable=not (self.progress and self.accelerator.is_main_process))
        start = time.perf_counter()
        try:
            while self.step < total:
                record = self.train_step()
                record["elapsed_s"] = time.perf_counter() - start
                history.append(record)
                bar.update(1)
                if self.step % self.config.log_every == 0 or self.step == total:
                    bar.set_postfix(fake=f"{record['fake_loss']:.4f}", gen=f"{record['generator_loss']:.4f}", K=record["steps"])
                    if log_file:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                if callback is not None:
                    callback(self, record)
                every = self.config.checkpoint_every
                if self.output_dir is not None and ((every and self.step % every == 0) or self.step == total):
                    self.save_checkpoint()
        finally:
            bar.close()
            if log_file:
                log_file.close()
        return history

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {
            "student": self.student_core.state_dict(),
            "fake": self.fake_core.state_dict(),
            "optimizers": {
                "generator": self.opt_g.state_dict(),
                "fake": self.opt_f.state_dict(),
                "generator_lr": self.sched_g.state_dict(),
                "fake_lr": self.sched_f.state_dict(),
            },
            "meta": {"step": self.step, "config": self.config.to_dict(), "world_size": self.accelerator.num_processes},
        }
        if self.ema is not None:
            state["ema"] = {str(i): s for i, s in enumerate(self.ema.shadow)}
        return state

    def _rank_state(self) -> dict:
        return {"rng": self.rng.get_state(), "steps_rng": self.steps_rng.get_state(), "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of everything needed to continue exactly; prunes to ``keep_last``."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write_rank_file(tmp, f"rank-{acc.process_index}", self._rank_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_state(tmp, self._state())
            commit_checkpoint(tmp, final, self.config.keep_last)
            if hasattr(self.student_core.model, "save_pretrained"):
                self.save_student(self.output_dir / "student")
            elif not self._warned_unsaveable:
                self._warned_unsaveable = True
                warnings.warn(
                    f"{type(self.student_core.model).__name__} has no save_pretrained: checkpoints hold its weights, "
                    "but no loadable student/ folder is written (use a diffusers ModelMixin to get one)"
                )
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restores networks, optimizers, LR schedules, RNG states and the step from a checkpoint."""
        state, rank_state = load_checkpoint(path, rank_file=f"rank-{self.accelerator.process_index}")
        saved = state["meta"]["config"]
        for key in ("steps", "steps_conditioning", "total_steps"):
            mine = self.config.to_dict()[key]
            if saved[key] != mine:
                raise ValueError(f"checkpoint was trained with {key}={saved[key]}, this run has {key}={mine}")
        self.student_core.load_state_dict(state["student"])
        self.fake_core.load_state_dict(state["fake"])
        self.opt_g.load_state_dict(state["optimizers"]["generator"])
        self.opt_f.load_state_dict(state["optimizers"]["fake"])
        self.sched_g.load_state_dict(state["optimizers"]["generator_lr"])
        self.sched_f.load_state_dict(state["optimizers"]["fake_lr"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("checkpoint has no EMA weights but this run uses ema_decay")
            for i, s in enumerate(self.ema.shadow):
                s.copy_(state["ema"][str(i)])
        self.rng.set_state(rank_state["rng"])
        self.steps_rng.set_state(rank_state["steps_rng"])
        torch.set_rng_state(rank_state["torch_rng"])
        self.step = int(state["meta"]["step"])

    @contextmanager
    def ema_weights(self):
        """The student with its EMA weights swapped in, in place (no copy of a possibly shared base);
        the training weights come back on exit. Without EMA, just the student."""
        if self.ema is None:
            yield self.student_core
            return
        backup = [p.detach().clone() for p in self.ema.params]
        self.ema.copy_to(self.ema.params)
        try:
            yield self.student_core
        finally:
            with torch.no_grad():
                for p, saved in zip(self.ema.params, backup):
                    p.copy_(saved)

    def final_student(self) -> Denoiser:
        """The student to keep once training is over: with EMA on, its EMA weights are copied in for good."""
        if self.ema is not None:
            self.ema.copy_to(self.ema.params)
        return self.student_core

    def save_student(self, path: str | Path) -> None:
        with self.ema_weights() as student:
            student.save_pretrained(path)

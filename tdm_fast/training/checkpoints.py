"""Checkpoints and resume of a :class:`~tdm_fast.trainer.TDMTrainer`, and the student it saves.

:class:`Checkpointing` is the trainer's checkpoint side (a mixin over its networks, optimisers, LR
schedules, EMA and random streams); the on-disk format is :mod:`tdm_fast.checkpoint`'s.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import fsdp
from ..checkpoint import CheckpointError, commit_checkpoint, load_checkpoint, replace_folder, write_rank_file, write_state
from ..denoiser import Denoiser
from .optim import EMA, LRSchedule
from .resume_record import KEY as TEACHER_KEY
from .resume_record import check_teacher_fingerprint

# Settings that only say how long to run and what to write: a resumed run may change them freely.
# ``steps``, ``steps_conditioning`` and ``total_steps`` shape the networks and can never change;
# every other setting changes the run and needs ``overrides`` (``--resume --override KEY``).
BOOKKEEPING = ("iterations", "checkpoint_every", "keep_last", "log_every", "max_nonfinite_skips", "kernels", "report_to",
               "validation_every", "compile", "compile_scope")
STRUCTURAL = ("steps", "steps_conditioning", "total_steps")
STUDENT_STATE = "tdm_training.json"  # in the student folder: the step its weights come from


class NonFiniteError(RuntimeError):
    """Training produced non-finite values too often to go on; nothing non-finite was written."""


def non_finite_tensors(state, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested state that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in non_finite_tensors(v, f"{prefix}.{i}")]
    return []


def _load_network(core, saved: dict, role: str, path) -> None:
    """``load_state_dict``, its error (a checkpoint of another architecture: another teacher network, LoRA rank
    or targets) said in one line."""
    try:
        core.load_state_dict(saved)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        first = details[0] if details else str(exc)
        raise ValueError(f"checkpoint {path} holds a {role} of another architecture than this run's "
                         f"({first[:160]}{'…' if len(first) > 160 else ''}): resume it with the teacher and the "
                         "settings it was trained with (--lora-rank, --lora-targets, --full-finetune)") from None


class Checkpointing:
    """Saving and restoring everything needed to continue a run exactly."""

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
            "meta": {"step": self.step, "config": self.config.to_dict(), "world_size": self.accelerator.num_processes,
                     "elapsed_s": self.elapsed_s, "lr_decay_iterations": self.sched_g.lr_lambdas[0].total,
                     TEACHER_KEY: self.teacher_fingerprint},
        }
        if self.ema is not None:
            state["ema"] = {str(i): s for i, s in enumerate(self.ema.shadow)}
        return state

    def _rank_state(self) -> dict:
        return {"rng": self.rng.get_state(), "steps_rng": self.steps_rng.get_state(), "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of everything needed to continue exactly; prunes to ``keep_last``.

        Refuses (:class:`NonFiniteError`) to write weights or optimizer state holding NaN or inf."""
        acc = self.accelerator
        state = self._state()
        shards = self._split_shards(state) if self.fsdp else {}
        bad = non_finite_tensors({k: v for k, v in state.items() if k != "meta"}) + non_finite_tensors(shards)
        if self.fsdp:  # each process sees its own shards; all of them must refuse together
            count = acc.reduce(torch.tensor([float(len(bad))], device=self.device), reduction="sum")
            bad = bad or (["the shards of another process"] if float(count) else [])
        if bad:
            raise NonFiniteError(f"not writing checkpoint step {self.step}: non-finite values in {', '.join(bad[:3])}"
                                 + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""))
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write_rank_file(tmp, f"rank-{acc.process_index}", {**self._rank_state(), **({"shards": shards} if shards else {})})
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_state(tmp, state)
            commit_checkpoint(tmp, final, self.config.keep_last)
        if hasattr(self.student_core.model, "save_pretrained"):
            self.save_student(self.output_dir / "student")
        elif acc.is_main_process and not self._warned_unsaveable:
            self._warned_unsaveable = True
            warnings.warn(
                f"{type(self.student_core.model).__name__} has no save_pretrained: checkpoints hold its weights, "
                "but no loadable student/ folder is written (use a diffusers ModelMixin to get one)"
            )
        acc.wait_for_everyone()
        return final

    @staticmethod
    def _split_shards(state: dict) -> dict:
        """Under FSDP the networks, the EMA and the optimizer moments are this process's shards: they go
        to its rank file (taken out of ``state``), the shared files keep the rest."""
        shards = {k: fsdp.local(state.pop(k)) for k in ("student", "fake", "ema") if k in state}
        shards["optimizers"] = {k: fsdp.local(state["optimizers"].pop(k)) for k in ("generator", "fake")}
        return shards

    def load_checkpoint(self, path: str | Path, overrides=()) -> None:
        """Restores networks, optimizers, LR schedules, RNG states and the step from a checkpoint.

        A setting that changes the run (anything but :data:`BOOKKEEPING`) must equal the checkpoint's
        unless it is named in ``overrides``; the optimizers, LR schedules and RNG streams then really
        use the new values. The settings of :data:`STRUCTURAL` can never change. A raised ``iterations``
        keeps the LR decay's original length (the rate stays at its floor past it) unless ``iterations`` is
        in ``overrides``, which stretches the decay to the new length. ``elapsed_s`` continues.
        """
        state, rank_state = load_checkpoint(path, rank_file=f"rank-{self.accelerator.process_index}")
        try:
            self._restore(path, state, rank_state, overrides)
        except KeyError as exc:  # a state.json of an older version (no digest to refuse it by) edited by hand
            raise CheckpointError(f"checkpoint {path} lacks {exc}: restore its state.json, or resume from another "
                                  "checkpoint") from None

    def _restore(self, path, state: dict, rank_state: dict, overrides) -> None:
        self.check_resume_config(state["meta"]["config"], overrides)
        check_teacher_fingerprint(state["meta"], self.teacher_fingerprint, path)
        self.teacher_fingerprint = self.teacher_fingerprint or state["meta"].get(TEACHER_KEY)  # kept in later checkpoints
        if self.fsdp:
            shards = rank_state.get("shards")
            if shards is None or state["meta"].get("world_size") != self.accelerator.num_processes:
                raise ValueError(f"{path} was not written by a fully sharded run on {self.accelerator.num_processes} "
                                 f"processes (it has world size {state['meta'].get('world_size')}, "
                                 f"{'sharded' if shards else 'unsharded'}): resume it as it was launched")
            fsdp.load_shards(self.student_core, shards["student"])
            fsdp.load_shards(self.fake_core, shards["fake"])
            self.opt_g.load_state_dict(fsdp.optimizer_state_from_shards(shards["optimizers"]["generator"], self.opt_g))
            self.opt_f.load_state_dict(fsdp.optimizer_state_from_shards(shards["optimizers"]["fake"], self.opt_f))
            ema = shards.get("ema")
        else:
            _load_network(self.student_core, state["student"], "student", path)
            _load_network(self.fake_core, state["fake"], "fake score", path)
            self.opt_g.load_state_dict(state["optimizers"]["generator"])
            self.opt_f.load_state_dict(state["optimizers"]["fake"])
            ema = state.get("ema")
        self.sched_g.load_state_dict(state["optimizers"]["generator_lr"])
        self.sched_f.load_state_dict(state["optimizers"]["fake_lr"])
        if self.ema is not None:
            if ema is not None:
                for i, s in enumerate(self.ema.shadow):
                    fsdp.local(s).copy_(ema[str(i)])
            elif "ema_decay" in overrides:  # EMA switched on by the resume: it starts from the restored weights
                self.ema = EMA(self.ema.params, self.config.ema_decay)
            else:
                raise ValueError("checkpoint has no EMA weights but this run uses ema_decay (add --override ema_decay)")
        self.rng.set_state(rank_state["rng"])
        self.steps_rng.set_state(rank_state["steps_rng"])
        torch.set_rng_state(rank_state["torch_rng"])
        self.step = int(state["meta"]["step"])
        self.elapsed_s = float(state["meta"].get("elapsed_s", 0.0))
        decay_length = int(state["meta"].get("lr_decay_iterations", state["meta"]["config"]["iterations"]))
        self._apply_hyperparameters(self.config.iterations if "iterations" in overrides else decay_length)
        if "seed" in overrides:
            self.rng.manual_seed(self.config.seed * 7919 + self.accelerator.process_index)
            self.steps_rng.manual_seed(self.config.seed)

    def check_resume_config(self, saved: dict, overrides=()) -> None:
        """Raises ValueError naming every setting that differs from the checkpoint's without an override."""
        def precision(value) -> str:  # None (Python callers, runs of older versions): accelerate's setting as it resolves now
            return dataclasses.replace(self.config, mixed_precision=value).effective_mixed_precision

        mine = {**self.config.to_dict(), "mixed_precision": precision(self.config.mixed_precision)}
        saved = {**saved, "mixed_precision": precision(saved.get("mixed_precision"))}
        for key in overrides:
            if key not in mine:
                raise ValueError(f"--override {key}: not a setting (choose among {', '.join(sorted(mine))})")
            if key in STRUCTURAL or (key in BOOKKEEPING and key != "iterations"):  # iterations: stretch the LR decay
                raise ValueError(f"--override {key}: " + ("it shapes the networks and cannot change on resume" if key in STRUCTURAL
                                                          else "it may change on resume without --override"))
        for key in STRUCTURAL:
            if saved.get(key) != mine[key]:
                raise ValueError(f"checkpoint was trained with {key}={saved.get(key)}, this run has {key}={mine[key]}")
        changed = [k for k in mine if k not in BOOKKEEPING and k not in STRUCTURAL and k not in overrides
                   and k in saved and saved[k] != mine[k]]
        if changed:
            listing = ", ".join(f"{k} {saved[k]} -> {mine[k]}" for k in changed)
            raise ValueError(f"the checkpoint was trained with other settings ({listing}); resume with the checkpoint's "
                             f"values, or pass --override {' '.join(changed)} to continue with the new ones")

    def _apply_hyperparameters(self, decay_length: int) -> None:
        """Learning rates, warm-up, betas and weight decay from this run's config, on restored optimizers
        (``load_state_dict`` brings back the checkpoint's values, the LR schedules' base rates included);
        the LR decay reaches its floor at ``decay_length`` iterations."""
        config = self.config
        betas = (config.adam_beta1, config.adam_beta2)
        for optimizer, scheduler, lr in ((self.opt_g, self.sched_g, config.generator_lr), (self.opt_f, self.sched_f, config.fake_lr)):
            warmup = LRSchedule(config.warmup_steps, config.lr_decay, decay_length, config.lr_decay_floor)
            bases = [lr] + [lr * config.steps_embedding_lr_ratio] * (len(optimizer.param_groups) - 1)
            scheduler.base_lrs = bases
            scheduler.lr_lambdas = [warmup] * len(bases)
            for group, base in zip(optimizer.param_groups, bases):
                group.update(initial_lr=base, lr=base * warmup(scheduler.last_epoch), betas=betas, weight_decay=config.weight_decay)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

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
        """The student to keep once training is over: with EMA on, its EMA weights are copied in for good.

        Under FSDP every process must call it: the main process gets the gathered, unsharded student,
        the others their sharded one."""
        if self.ema is not None:
            self.ema.copy_to(self.ema.params)
        if self.fsdp:
            return fsdp.gather_into(self._export_template, self.student_core, self.accelerator.is_main_process) or self.student_core
        return self.student_core

    def save_student(self, path: str | Path) -> None:
        """Writes the student (EMA weights where used) beside ``path``, then renames it into place, so a
        kill leaves the previous complete student or none; ``tdm_training.json`` records its step.

        Only the main process writes; under FSDP every process must call it (the student is gathered)."""
        if self.fsdp:
            with self.ema_weights() as sharded:
                gathered = fsdp.gather_into(self._export_template, sharded, self.accelerator.is_main_process)
        if not self.accelerator.is_main_process:
            return

        def write(folder: Path) -> None:
            if self.fsdp:
                gathered.save_pretrained(folder)
            else:
                with self.ema_weights() as student:
                    student.save_pretrained(folder)
            (folder / STUDENT_STATE).write_text(json.dumps({"step": self.step}))

        replace_folder(Path(path), write)

    def student_is_current(self) -> bool:
        """Whether ``<output_dir>/student`` is a complete student of the current step."""
        folder = self.output_dir / "student"
        try:
            return json.loads((folder / STUDENT_STATE).read_text()).get("step") == self.step
        except (OSError, ValueError, AttributeError):
            return False

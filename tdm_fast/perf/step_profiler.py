"""Per-iteration time breakdown of a TDM training step, without touching the trainer's code.

:class:`StepProfiler` instruments one :class:`~tdm_fast.trainer.TDMTrainer` *instance*:

* forward pre/post hooks on the three denoisers (student, fake, teacher) time every network call,
  labelled by network, phase (rollout / fake update / generator update) and grad mode;
* the trainer's phase methods, ``trainer.ops`` (the fused or reference TDM kernels),
  ``accelerator.backward``, the optimizers' ``step``/``zero_grad``, the LR schedulers, gradient
  clipping, EMA, the condition sampler, ``draw_stage`` and ``match`` are replaced by timed
  wrappers as instance attributes (the class is untouched; :meth:`detach` restores everything).

Regions nest (``match`` calls ``ops.renoise``); each region is charged its *exclusive* time, so the
categories add up to the step's wall-clock, and what no region covers is "other (python glue,
.item(), casts)". On CUDA every region boundary calls ``torch.cuda.synchronize()`` so that
asynchronous kernels are charged to the region that launched them — this serialises the step a
little (it removes CPU/GPU overlap between regions), so the profiled total is an upper bound.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict

import torch

# objective="fisher" backpropagates through teacher and fake inside the student's backward
FISHER_BACKWARD = "teacher+fake bwd to x_τ (fisher)"
NETWORK_CATEGORIES = (
    "student fwd (rollout, no grad)",
    "student fwd (fake update, no grad)",
    "fake fwd (grad)",
    "fake bwd",
    "student fwd (grad)",
    "student bwd",
    "teacher fwd (cond+uncond, 2B)",
    "fake fwd (generator, no grad)",
    "fake fwd (generator, grad: fisher)",
    FISHER_BACKWARD,
)
OTHER_CATEGORIES = (
    "TDM kernels (renoise, ddim_jump, losses)",
    "optimizer (step, zero_grad, lr, clip, EMA)",
    "data/noise (conditions, randn, stage draw)",
    "other (python glue, .item(), casts)",
)
CATEGORIES = NETWORK_CATEGORIES + OTHER_CATEGORIES
OPS = ("renoise", "ddim_jump", "fake_score_loss", "tdm_generator_loss")


class _TimedOps:
    """Stands in for ``trainer.ops``: same functions, each timed."""

    def __init__(self, ops, profiler):
        self._ops = ops
        for name in OPS:
            setattr(self, name, profiler._wrap(getattr(ops, name), "TDM kernels (renoise, ddim_jump, losses)"))

    def __getattr__(self, name):
        return getattr(self._ops, name)


class StepProfiler:
    """Attach to a trainer, run steps, read :meth:`summary`. Use as a context manager or attach/detach."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cuda = trainer.device.type == "cuda"
        self.phase = "outside"
        self._stack: list[str] = []
        self._last = 0.0
        self._handles = []
        self._saved: list[tuple[object, str, bool, object]] = []
        self._open_backwards = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.step_seconds: list[float] = []

    # -- exclusive-time region stack -----------------------------------------------------------
    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, category: str) -> None:
        now = self._now()
        if self._stack:
            self.totals[self._stack[-1]] += now - self._last
        self._stack.append(category)
        self._last = now

    def _exit(self) -> None:
        now = self._now()
        self.totals[self._stack.pop()] += now - self._last
        self._last = now

    def _wrap(self, fn, category):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            cat = category(*args, **kwargs) if callable(category) else category
            self._enter(cat)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return timed

    def _patch(self, obj, name: str, category) -> None:
        had = name in vars(obj)
        self._saved.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, self._wrap(getattr(obj, name), category))

    # -- attaching -----------------------------------------------------------------------------
    def _network_category(self, role: str) -> str:
        grad = torch.is_grad_enabled()
        if role == "teacher":
            return "teacher fwd (cond+uncond, 2B)"
        if role == "student":
            if self.phase == "rollout":
                return "student fwd (rollout, no grad)"
            if self.phase == "fake":
                return "student fwd (fake update, no grad)"
            return "student fwd (grad)" if grad else "student fwd (rollout, no grad)"
        if self.phase == "generator":
            return "fake fwd (generator, grad: fisher)" if grad else "fake fwd (generator, no grad)"
        return "fake fwd (grad)" if grad else "fake fwd (generator, no grad)"

    def _backward_started(self, grad):
        if self._open_backwards == 0:
            self._enter(FISHER_BACKWARD)
        self._open_backwards += 1

    def _backward_finished(self, grad):
        self._open_backwards -= 1
        if self._open_backwards == 0:
            self._exit()

    def _time_backward(self, args, output) -> None:
        """Carves the Fisher objective's backward through teacher and fake out of "student bwd": the
        gradient reaching a network's output opens the region, the one leaving its input closes it
        (counted, so that the two networks' back-to-back stretches make one region)."""
        x, x0 = args[0], output[0]
        if x0.requires_grad and x.requires_grad:
            x0.register_hook(self._backward_started)
            x.register_hook(self._backward_finished)

    def _hook_network(self, module, role: str) -> None:
        def pre(mod, args):
            self._enter(self._network_category(role))

        def post(mod, args, output):
            self._exit()
            if role != "student" and self.phase == "generator":
                self._time_backward(args, output)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def _phase(self, fn, phase):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            previous, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = previous

        return run

    def attach(self) -> "StepProfiler":
        tr = self.trainer
        for role, module in (("student", tr.student_core), ("fake", tr.fake_core), ("teacher", tr.teacher)):
            self._hook_network(module, role)
        # the teacher's cond_uncond calls self(...) once at 2B: the hook on the module covers it
        for name, phase in (("rollout", "rollout"), ("fake_score_update", "fake"), ("generator_update", "generator")):
            self._saved.append((tr, name, name in vars(tr), vars(tr).get(name)))
            setattr(tr, name, self._phase(getattr(tr, name), phase))
        self._saved.append((tr, "ops", True, tr.ops))
        tr.ops = _TimedOps(tr.ops, self)
        self._patch(tr.accelerator, "backward", lambda *a, **k: "fake bwd" if self.phase == "fake" else "student bwd")
        optimizer = "optimizer (step, zero_grad, lr, clip, EMA)"
        for obj in (tr.opt_f, tr.opt_g):
            self._patch(obj, "step", optimizer)
            self._patch(obj, "zero_grad", optimizer)
        for obj in (tr.sched_f, tr.sched_g):
            self._patch(obj, "step", optimizer)
        self._patch(tr.accelerator, "clip_grad_norm_", optimizer)
        if tr.ema is not None:
            self._patch(tr.ema, "update", optimizer)
        data = "data/noise (conditions, randn, stage draw)"
        self._saved.append((tr, "conditions", True, tr.conditions))
        tr.conditions = self._wrap(tr.conditions, data)
        self._patch(tr, "draw_stage", data)
        self._patch(tr, "match", data)
        self._patch(tr, "train_step", "other (python glue, .item(), casts)")
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for obj, name, had, value in reversed(self._saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self._saved.clear()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # -- running and reading -------------------------------------------------------------------
    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0
        self.step_seconds.clear()

    def step(self) -> dict:
        """One profiled ``train_step``; the step's wall-clock is recorded."""
        start = self._now()
        record = self.trainer.train_step()
        self.step_seconds.append(self._now() - start)
        self.steps += 1
        return record

    def summary(self) -> dict:
        """Mean milliseconds per step for every category, the total, and the share outside network passes."""
        n = max(self.steps, 1)
        ms = {c: 1e3 * self.totals.get(c, 0.0) / n for c in CATEGORIES}
        total = sum(ms.values())
        network = sum(ms[c] for c in NETWORK_CATEGORIES)
        return {
            "breakdown_ms": ms,
            "step_ms": total,
            "wall_step_ms": 1e3 * sum(self.step_seconds) / n,
            "network_ms": network,
            "outside_network_share": (total - network) / total if total else 0.0,
            "steps": self.steps,
        }


def format_breakdown(summaries: dict[str, dict]) -> str:
    """A markdown table: one column per run (e.g. 'toy fused', 'toy reference'), ms per step and % of step."""
    names = list(summaries)
    lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in CATEGORIES:
        cells = []
        for n in names:
            s = summaries[n]
            v = s["breakdown_ms"][c]
            cells.append(f"{v:.3f} ms ({100 * v / s['step_ms']:.1f} %)" if s["step_ms"] else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **step total** | " + " | ".join(f"**{summaries[n]['step_ms']:.3f} ms**" for n in names) + " |")
    lines.append("| **outside network passes** | " + " | ".join(
        f"**{100 * summaries[n]['outside_network_share']:.1f} %**" for n in names) + " |")
    return "\n".join(lines)


# -- the built-in teachers, ready to profile ------------------------------------------------------
def make_trainer(teacher: str = "toy", kernels: str = "fused", batch: int | None = None, steps=(4,), seed: int = 0,
                 teacher_model=None, **config_overrides):
    """A TDMTrainer on a built-in teacher ('toy': ToyMLP 2-D; 'digits': DigitsUNet 8×8), no output dir.

    Timing does not depend on the weights, so a freshly initialised teacher is used unless
    ``teacher_model`` (a Denoiser) is given.
    """
    from ..config import TDMConfig
    from ..trainer import ClassConditions, TDMTrainer

    if teacher == "toy":
        from ..demos.toy2d import NUM_CLASSES, toy_denoiser

        den = teacher_model or toy_denoiser()
        shape, classes, cfg, default_batch = (2,), NUM_CLASSES, 3.0, 1024
    elif teacher == "digits":
        from ..demos.digits import DIGITS_CFG_SCALE, IMAGE_SIZE, NUM_CLASSES, digits_denoiser

        den = teacher_model or digits_denoiser()
        shape, classes, cfg, default_batch = (1, IMAGE_SIZE, IMAGE_SIZE), NUM_CLASSES, DIGITS_CFG_SCALE, 128
    else:
        raise ValueError(f"unknown built-in teacher {teacher!r}: 'toy' or 'digits'")
    den.model.eval().requires_grad_(False)
    settings = dict(steps=tuple(steps), batch_size=batch or default_batch, kernels=kernels, cfg_scale=cfg, seed=seed)
    settings.update(config_overrides)
    config = TDMConfig(**settings)
    return TDMTrainer(den, config, ClassConditions(classes), shape, output_dir=None, progress=False)

"""The student's deterministic K-step sampler (spec §2) and the teacher's DDIM baselines (spec §9)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .parameterization import broadcast
from .solvers import correct, multistep_coefficients

TAU_MIN = 20  # the smallest noise level the fake score is trained on (spec §3)
TAU_GAP = 10  # τ stays this far below the stage's own time t


def stage_times(steps: int, total_steps: int = 900, num_train_timesteps: int = 1000, training: bool = True) -> list[int]:
    """``t_0 = T' - 1``, ``t_{i+1} = t_i - T'/K``: K=4 → [899, 674, 449, 224].

    Raises ``ValueError`` when K is not a positive integer, when two stages would share a time (K > T'),
    or, for ``training`` (the fake score's τ-intervals need room), when a stage's τ-interval
    ``[max(20, t_{k+1} + 1), t_k - 10)`` would be empty; sampling passes ``training=False``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (K) must be a positive integer, got {steps!r}")
    if not isinstance(total_steps, int) or not 0 < total_steps <= num_train_timesteps:
        raise ValueError(f"total_steps (T') must be an integer in (0, {num_train_timesteps}], got {total_steps!r}")
    stride = total_steps / steps
    times = [int(round(total_steps - 1 - i * stride)) for i in range(steps)]
    if len(set(times)) < steps:
        raise ValueError(f"K={steps} with T'={total_steps}: the stage times {times} repeat; use at most {total_steps} steps")
    for k, t in enumerate(times if training else ()):
        low = max(TAU_MIN, times[k + 1] + 1 if k + 1 < steps else 0)
        if t - TAU_GAP <= low:
            raise ValueError(
                f"K={steps} with T'={total_steps}: stage {k} (t={t}) has an empty noise interval "
                f"[{low}, {t - TAU_GAP}); use fewer steps or a larger T'"
            )
    return times


def trailing_times(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM 'trailing' spacing: [999, 999 - T/n, ...], the usual choice for few-step teachers."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return [int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1 for i in range(steps)]


def _jump(denoiser: Denoiser, x0, eps, t_next: int):
    alpha, sigma = denoiser.schedule(torch.full((x0.shape[0],), t_next, device=x0.device), dtype=torch.float32)
    return (broadcast(alpha, x0) * x0.float() + broadcast(sigma, x0) * eps.float()).to(x0.dtype)


@torch.no_grad()
def sample_student(
    student: Denoiser,
    noise: torch.Tensor,
    cond,
    steps: int,
    total_steps: int = 900,
    return_trajectory: bool = False,
    solver: str = "ddim",
):
    """Deterministic K-step sampling: x̂0 at each t_i, a jump to t_{i+1}, output the last x̂0. Any K up to
    T' samples: the τ-interval rule of :func:`stage_times` is training's.

    ``solver``: ``ddim`` (spec §2) or ``dpmsolver`` (DPM-Solver++(2M), :mod:`tdm_fast.solvers`); a
    student may be sampled with the solver it was not trained with (Table 6). With
    ``return_trajectory`` also returns the list of visited states ``x_{t_0..t_{K-1}}``.
    """
    times = stage_times(steps, total_steps, student.schedule.num_train_timesteps, training=False)
    coefficients = multistep_coefficients(student.schedule, times, solver)
    x, trajectory, x0_prev = noise, [], None
    for i, t in enumerate(times):
        trajectory.append(x)
        x0, eps = student(x, t, cond, steps=steps if student.steps_set else None)
        if i + 1 < len(times):
            if coefficients[i]:
                alpha, sigma = student.schedule(t, dtype=torch.float32, device=x0.device)
                jump_x0, jump_eps = correct(x0.float(), eps.float(), x0_prev, coefficients[i], alpha, sigma)
                x = _jump(student, jump_x0, jump_eps, times[i + 1]).to(x0.dtype)
            else:
                x = _jump(student, x0, eps, times[i + 1])
            x0_prev = x0.float()
    return (x0, trajectory) if return_trajectory else x0


@torch.no_grad()
def ddim_sample(teacher: Denoiser, noise: torch.Tensor, cond, times: list[int], cfg_scale: float = 1.0):
    """Deterministic DDIM through ``times`` (descending), with CFG; returns the last x̂0."""
    if not times or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be a non-empty descending list, got {times}")
    x = noise
    for i, t in enumerate(times):
        x0, eps = teacher.guided(x, t, cond, cfg_scale)
        if i + 1 < len(times):
            x = _jump(teacher, x0, eps, times[i + 1])
    return x0


@dataclass(frozen=True)
class TeacherSampler:
    """A training-free teacher sampler: DDIM at ``times`` with CFG scale ``cfg_scale``."""

    name: str
    times: tuple[int, ...]
    cfg_scale: float

    @property
    def nfe(self) -> int:
        return len(self.times) * (2 if self.cfg_scale != 1.0 else 1)

    def __call__(self, teacher: Denoiser, noise, cond):
        return ddim_sample(teacher, noise, cond, list(self.times), self.cfg_scale)


def nfe_matched_baselines(steps: int, cfg_scale: float, total_steps: int = 900, T: int = 1000) -> list[TeacherSampler]:
    """The candidates of spec §9 for a K-step student: every sampler uses at most K evaluations.

    DDIM without CFG at the student's own times and at trailing times; with CFG at K/2 steps when
    K >= 2 (each CFG step costs two evaluations). The fair baseline is the best of these.
    """
    own = tuple(stage_times(steps, total_steps, T, training=False))
    candidates = [
        TeacherSampler(f"ddim{steps}-student-times", own, 1.0),
        TeacherSampler(f"ddim{steps}-trailing", tuple(trailing_times(steps, T)), 1.0),
    ]
    if steps >= 2:
        half = steps // 2
        candidates.append(TeacherSampler(f"ddim{half}-cfg-student-times", tuple(stage_times(half, total_steps, T, training=False)), cfg_scale))
        candidates.append(TeacherSampler(f"ddim{half}-cfg-trailing", tuple(trailing_times(half, T)), cfg_scale))
    return candidates


def reference_sampler(steps: int, cfg_scale: float, T: int = 1000) -> TeacherSampler:
    """The teacher's many-step CFG sampler whose distribution the student targets."""
    return TeacherSampler(f"teacher{steps}-cfg", tuple(trailing_times(steps, T)), cfg_scale)


def check_steps(steps, student: Denoiser, total_steps: int = 900) -> None:
    """Refuses (as ``--steps K``) a K that has no stage times or that the student was not trained for."""
    from .usage import UsageError

    for k in steps:
        try:
            stage_times(k, total_steps, training=False)
        except ValueError as exc:
            raise UsageError(f"--steps {k}: {exc}") from None
        if student.steps_set and k not in student.steps_set:
            raise UsageError(f"--steps {k}: this student was trained for K in {list(student.steps_set)}")

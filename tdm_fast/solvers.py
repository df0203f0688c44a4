"""The solver that defines the student's trajectory (issue 19; the paper's Table 6).

``ddim``: spec §2, the deterministic jump ``x_{t_{i+1}} = α x̂0_i + σ ε̂_i``.
``dpmsolver``: DPM-Solver++(2M) (Lu et al. 2022: data prediction, multistep, midpoint form, as
diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``) over the
student's own stage times. Its step from t_i to t_{i+1} is the DDIM jump made from a corrected data
prediction, which is how every consumer (sampler, diffusers scheduler, exported graph, trainer's
matching) shares one formula:

    D_i = x̂0_i + c_i (x̂0_i − x̂0_{i−1}),   c_i = h_i / (2 h_{i−1}),   h_i = λ_{t_{i+1}} − λ_{t_i},   λ = log(α/σ)
    ε_i = (x_{t_i} − α_{t_i} D_i) / σ_{t_i}   (so x_{t_i} = α D_i + σ ε_i and the jump is α D_i + σ ε_i)

The first step has no previous prediction (first order, c_0 = 0), and the last stage outputs its own
x̂0: diffusers' final step to σ = 0 is first order (``lower_order_final``; always so with
``final_sigmas_type="zero"``), and a first-order step to σ = 0 returns x̂0. With K <= 2 the two solvers
therefore coincide.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .schedule import NoiseSchedule

SOLVERS = ("ddim", "dpmsolver")


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def multistep_coefficients(schedule: NoiseSchedule, times: list[int], solver: str) -> list[float]:
    """c_i of each stage (0 where the step is first order or there is no step); all zeros for DDIM.

    λ in float64 from the schedule's tables, so the coefficients do not depend on the compute dtype."""
    check_solver(solver)
    if solver == "dpmsolver" and len(times) > 2:
        alpha, sigma = schedule(torch.tensor(times), dtype=torch.float64)
        return lambda_coefficients((alpha.log() - sigma.log()).tolist(), solver)
    return [0.0] * len(times)


def lambda_coefficients(lambdas: list[float], solver: str) -> list[float]:
    """c_i of each stage from λ = log(α/σ) of the stages (float64), for stages that are not integer
    training times (a flow σ grid, custom σ)."""
    check_solver(solver)
    coefficients = [0.0] * len(lambdas)
    if solver == "dpmsolver":
        h = [lambdas[i + 1] - lambdas[i] for i in range(len(lambdas) - 1)]
        for i in range(1, len(lambdas) - 1):
            coefficients[i] = h[i] / (2.0 * h[i - 1])
    return coefficients


def correct(x0, eps, x0_prev, coefficient, alpha, sigma):
    """``(D, ε)`` of the module docstring from the student's ``(x̂0, ε̂)`` at (α, σ) of the current stage.

    ``coefficient``, ``alpha`` and ``sigma`` are floats or tensors that broadcast against ``x0``."""
    delta = coefficient * (x0 - x0_prev)
    return x0 + delta, eps - (alpha / sigma) * delta


def trained_solver(checkpoint) -> str:
    """``student_solver`` of the run a checkpoint comes from (the run folder's config.json, also found from
    its student/), ddim where no run config says (a bare student folder, a run from before the setting):
    sampling defaults to the trajectory the student was trained on."""
    path = Path(checkpoint)
    for run in (path, path.parent):
        try:
            saved = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and "total_steps" in saved:  # a TDMConfig, not a model's config.json
            return check_solver(saved.get("student_solver", "ddim"))
    return "ddim"

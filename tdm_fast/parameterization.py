"""Conversions between a network's raw output and the (x0, ε) pair the method works with (spec §1)."""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return prediction_type


def broadcast(scalar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-sample scalar of shape (B,) (or a 0-d tensor) so it broadcasts against ``like``."""
    scalar = torch.as_tensor(scalar, device=like.device)
    if scalar.dim() == 0:
        return scalar
    return scalar.reshape(scalar.shape[0], *([1] * (like.dim() - 1)))


def to_x0_eps(output, x_t, alpha, sigma, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output at (x_t, α, σ) into an x0-prediction and an ε-prediction."""
    a, s = broadcast(alpha, x_t), broadcast(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - s * output, s * x_t + a * output
    if prediction_type == "flow":
        return x_t - s * output, x_t + (1 - s) * output
    if prediction_type == "sample":
        return output, (x_t - a * output) / s
    check_prediction_type(prediction_type)


def from_x0_eps(x0, eps, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The network output that :func:`to_x0_eps` maps to ``(x0, eps)`` (used by tests and schedulers)."""
    a, s = broadcast(alpha, x0), broadcast(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "flow":
        return eps - x0
    if prediction_type == "sample":
        return x0
    check_prediction_type(prediction_type)

"""Input checks that never make a training step wait for its device."""
from __future__ import annotations

from typing import Callable

import torch


def check(condition: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raises ValueError(``message`` + ``detail()``) unless the boolean tensor ``condition`` is all true.

    On an accelerator the check is a device-side assertion: the host does not wait for the device, and
    a failure surfaces as a device assert at the next synchronisation. On the CPU it fails at once; only
    then is ``detail`` (which may read tensors) evaluated.
    """
    condition = condition.all()
    if condition.device.type != "cpu":
        torch._assert_async(condition, message)
        return
    try:
        torch._assert_async(condition, message)
    except RuntimeError:
        raise ValueError(message + (detail() if detail is not None else "")) from None

"""Boundary checks shared by the merge steps."""

from __future__ import annotations

import torch


def check_metric(metric: torch.Tensor) -> None:
    if not isinstance(metric, torch.Tensor) or metric.dim() != 3:
        shape = tuple(metric.shape) if isinstance(metric, torch.Tensor) else type(metric).__name__
        raise ValueError(f"metric must be a [B, N, C] tensor, got {shape}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}")


def check_r(r: int, max_r: int, what: str) -> int:
    """Validate the number of tokens to remove; return it as an int."""
    try:
        is_integer = not isinstance(r, bool) and int(r) == r
    except (TypeError, ValueError, OverflowError):  # None, "2", nan, inf
        is_integer = False
    if not is_integer:
        raise ValueError(f"r must be an integer between 0 and {max_r} for {what}, got {r!r}")
    r = int(r)
    if r < 0 or r > max_r:
        raise ValueError(f"r={r} is out of range: {what} can remove between 0 and {max_r} tokens")
    return r

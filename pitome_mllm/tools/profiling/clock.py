"""Clocks for the profiler: a stopwatch and a per-pass clock of disjoint stage intervals, and their statistics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch


def summarize(samples: Sequence[float]) -> dict[str, float] | None:
    """Median, quartiles, IQR, min, max and count of ``samples`` (None when empty)."""
    if not samples:
        return None
    import numpy as np

    values = np.asarray(samples, dtype=float)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


class Stopwatch:
    """Time stamps on the host (CPU) or on the CUDA stream (events, read after a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class PassClock:
    """Named stamps of one pass, plus the merge intervals recorded during it."""

    def __init__(self, stopwatch: Stopwatch) -> None:
        self.stopwatch = stopwatch
        self.marks: dict[str, Any] = {}
        self.decode_marks: list[Any] = []
        # decide / apply / trace: the three parts of a tower merge step; projector: its stage.
        self.merge_intervals: dict[str, list[tuple[Any, Any]]] = {
            kind: [] for kind in ("decide", "apply", "trace", "projector")
        }

    def mark(self, name: str) -> None:
        self.marks[name] = self.stopwatch.stamp()

    def interval(self, start: str, end: str) -> float | None:
        if start not in self.marks or end not in self.marks:
            return None
        return self.stopwatch.seconds(self.marks[start], self.marks[end])

    def merge_seconds(self, *kinds: str) -> float:
        return sum(self.stopwatch.seconds(a, b) for kind in kinds for a, b in self.merge_intervals[kind])

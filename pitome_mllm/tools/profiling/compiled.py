"""A module's forward run through ``torch.compile`` next to its eager self, and the graph breaks it took.

Users compile their models; a benchmark of the compiled path has to compile the same module it times
eagerly, patched or not, and say how many graphs Dynamo split it into (a graph break is a trip back to
Python, and in ``mode="reduce-overhead"`` the end of a CUDA graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["compiled_forward", "dynamo_counts"]


@contextlib.contextmanager
def compiled_forward(module: nn.Module, **compile_options: Any) -> Iterator[Callable]:
    """Inside the block, ``module(...)`` runs its forward through ``torch.compile(**compile_options)``.

    The compiled function becomes the instance's ``forward`` (what ``nn.Module.__call__`` calls), so the
    module's own forward (pre-)hooks, such as the profiler's stage stamps, stay outside the graph, while
    the hooks of its submodules (the merge hooks on the encoder layers) are traced into it, as when a user
    compiles the module. Leaving the block gives the module back its previous ``forward``.
    """
    previous = module.__dict__.get("forward")  # an instance-level forward someone else set, if any
    compiled = torch.compile(module.forward, **compile_options)
    module.forward = compiled
    try:
        yield compiled
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def dynamo_counts() -> dict[str, int]:
    """Graph breaks and graphs Dynamo has produced in this process so far (take differences around a run)."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "graphs": int(counters["stats"]["unique_graphs"]),
    }

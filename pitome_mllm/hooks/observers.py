"""Observers: watch the stages of a patched forward without changing them.

The hooks announce every stage they run to an `Observers` list (one per patch, shared by
the tower and the projector stage): an observer is told when a stage starts and
finishes, and gets each tower merge step once it is decided. Profiling times the stages
this way and the merge-map visualisation records the steps; neither touches the hooks.

Stages, in the order one image meets them:

* ``"decide"`` - a tower layer's merge step is decided on its metric (``layer_idx`` set);
* ``"apply"`` - the step is applied to the layer output (``layer_idx`` set);
* ``"trace"`` - the source map and token sizes follow the step (``layer_idx`` set);
* ``"projector"`` - the projector stage merges to the budget (``layer_idx`` None).

With no observer attached a stage costs one truth test.

Under ``torch.compile`` the observers' methods are traced into the graph: Python bookkeeping
(counting, appending to a list) compiles without a graph break and is replayed at every call,
but what needs the host between stages cannot be captured. Those observers (timing the stages on
a host clock, keeping every step's `Merge`) run eagerly only and call `eager_only`, which stops a
compiled call with one line that says so, rather than breaking the graph around every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..merge import Merge

STAGES = ("decide", "apply", "trace", "projector")


@torch.compiler.disable(reason="pitome_mllm's merge timing and merge recording run eagerly only")
def _refuse_compiled(message: str) -> None:
    # Disabled for dynamo, so the compiled code calls it when it runs (inside the trace, a raise
    # would only make dynamo run the frame eagerly, and the check would pass there).
    raise RuntimeError(message)


def eager_only(message: str) -> None:
    """Raise ``RuntimeError(message)`` when called from code ``torch.compile`` is capturing; else nothing.

    With ``fullgraph=True`` dynamo refuses at compile time instead, naming merge timing and recording.
    """
    if torch.compiler.is_compiling():
        _refuse_compiled(message)


class Observer:
    """Base class of observers; override what you need (every method is a no-op here).

    Under ``torch.compile`` the methods are traced with the stages they watch (module docstring):
    an observer that needs the host between stages calls `eager_only` first.
    """

    def stage_started(self, stage: str, layer_idx: int | None) -> None:
        """``stage`` (one of `STAGES`) is about to run."""

    def stage_finished(self, stage: str, layer_idx: int | None) -> None:
        """``stage`` has run (also when it raised)."""

    def merged(self, layer_idx: int, step: Merge) -> None:
        """The tower merged after layer ``layer_idx`` with ``step``."""


class ObserverHandle:
    """Returned by `Observers.add`; ``remove()`` detaches the observer (idempotent)."""

    def __init__(self, observers: Observers, observer: Observer) -> None:
        self._observers = observers
        self.observer = observer

    def remove(self) -> None:
        self._observers.discard(self.observer)

    def __enter__(self) -> ObserverHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class Observers:
    """The observers of one patch, told about every stage the hooks run."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> ObserverHandle:
        if not isinstance(observer, Observer):
            raise TypeError(
                f"observers derive from pitome_mllm.hooks.observers.Observer, got {type(observer).__name__}"
            )
        self._observers.append(observer)
        return ObserverHandle(self, observer)

    def discard(self, observer: Observer) -> None:
        self._observers = [kept for kept in self._observers if kept is not observer]

    def clear(self) -> None:
        self._observers = []

    def __bool__(self) -> bool:
        return bool(self._observers)

    def __len__(self) -> int:
        return len(self._observers)

    def run(self, stage: str, layer_idx: int | None, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, announced as ``stage`` to every observer."""
        if not self._observers:
            return function(*args, **kwargs)
        observers = list(self._observers)
        for observer in observers:
            observer.stage_started(stage, layer_idx)
        try:
            return function(*args, **kwargs)
        finally:
            for observer in reversed(observers):
                observer.stage_finished(stage, layer_idx)

    def merged(self, layer_idx: int, step: Merge) -> None:
        for observer in list(self._observers):
            observer.merged(layer_idx, step)


__all__ = ["STAGES", "Observer", "ObserverHandle", "Observers", "eager_only"]

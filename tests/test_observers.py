"""`pitome_mllm.hooks.observers`: stages announced to observers, attached and detached by handle."""

from __future__ import annotations

import pytest

from pitome_mllm.hooks.observers import Observer, Observers

pytestmark = pytest.mark.model_facing


class Recorder(Observer):
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def stage_started(self, stage, layer_idx):
        self.log.append((self.name, "start", stage, layer_idx))

    def stage_finished(self, stage, layer_idx):
        self.log.append((self.name, "end", stage, layer_idx))


def test_stages_are_announced_around_the_call_in_nesting_order():
    log: list = []
    observers = Observers()
    observers.add(Recorder("a", log))
    observers.add(Recorder("b", log))
    assert observers.run("decide", 3, lambda x, y=0: x + y, 1, y=2) == 3
    assert log == [
        ("a", "start", "decide", 3),
        ("b", "start", "decide", 3),
        ("b", "end", "decide", 3),
        ("a", "end", "decide", 3),
    ]


def test_a_failing_stage_is_still_finished():
    log: list = []
    observers = Observers()
    observers.add(Recorder("a", log))

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        observers.run("projector", None, fail)
    assert log == [("a", "start", "projector", None), ("a", "end", "projector", None)]


def test_removed_observers_hear_nothing_more():
    log: list = []
    observers = Observers()
    handle = observers.add(Recorder("a", log))
    handle.remove()
    handle.remove()  # idempotent
    observers.run("apply", 0, lambda: None)
    assert log == [] and not observers


def test_only_observers_can_be_added():
    with pytest.raises(TypeError, match="derive from pitome_mllm.hooks.observers.Observer"):
        Observers().add(print)

"""Reversible forward overrides, in the spirit of accelerate's ``add_hook_to_module``.

An override replaces a module's ``forward`` with an instance attribute and records
what was there, so that `restore_forward` puts back exactly the previous state
(including a forward that another library, e.g. accelerate's device hooks, had
already installed on the instance).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_SAVED_FORWARD = "_pitome_saved_forward"
_MISSING = object()


def override_forward(module: nn.Module, make_forward: Callable[[Callable], Callable]) -> None:
    """Replace ``module.forward`` by ``make_forward(current_forward)``.

    Raises:
        RuntimeError: the module is already overridden (patching twice is an error).
    """
    if hasattr(module, _SAVED_FORWARD):
        raise RuntimeError(f"{type(module).__name__} already carries a pitome_mllm forward override")
    saved = module.__dict__.get("forward", _MISSING)
    current = module.forward
    object.__setattr__(module, _SAVED_FORWARD, saved)
    module.forward = make_forward(current)


def restore_forward(module: nn.Module) -> None:
    """Undo `override_forward` (no-op on a module that is not overridden)."""
    if not hasattr(module, _SAVED_FORWARD):
        return
    saved = module.__dict__.pop(_SAVED_FORWARD)
    if saved is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved


def is_overridden(module: nn.Module) -> bool:
    return hasattr(module, _SAVED_FORWARD)


class InstanceOverrides:
    """Instance attributes set on one object and later put back exactly.

    `set` records what the instance's ``__dict__`` held (or that it held nothing, so the
    class attribute showed through) before the first change of each name; `restore`
    brings every recorded name back and forgets them. Used for processor methods and
    model methods the adapters replace.
    """

    def __init__(self, target: object) -> None:
        self.target = target
        self._saved: dict[str, object] = {}

    def set(self, name: str, value: object) -> None:
        if name not in self._saved:
            self._saved[name] = self.target.__dict__.get(name, _MISSING)
        setattr(self.target, name, value)

    def restore(self) -> None:
        for name, saved in self._saved.items():
            if saved is _MISSING:
                self.target.__dict__.pop(name, None)
            else:
                setattr(self.target, name, saved)
        self._saved.clear()

    def __bool__(self) -> bool:
        return bool(self._saved)

"""Reversible forward overrides, in the spirit of accelerate's ``add_hook_to_module``.

An override replaces a module's ``forward`` with an instance attribute and records
what was there, so that `restore_forward` puts back exactly the previous state
(including a forward that another library, e.g. accelerate's device hooks, had
already installed on the instance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

_SAVED_FORWARD = "_pitome_saved_forward"


class _Missing:
    """Marks "the instance had no attribute of that name"; one object, also through copies."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()

COPY_REFUSED = (
    "a model patched by pitome_mllm cannot be copied or pickled: the patch's forwards and hooks belong to the "
    "original model, so a copy would still run (and unpatch) the original's modules. Call handle.unpatch(), "
    "copy or save the model, then patch the copy"
)


class _SavedForward:
    """What an overridden module's ``__dict__`` held under ``forward`` before the override.

    Kept in the module's ``__dict__``, so copying or pickling the module meets it and is refused
    with a clear message (the override closes over the original module).
    """

    __slots__ = ("forward",)

    def __init__(self, forward: object) -> None:
        self.forward = forward

    def __deepcopy__(self, memo: dict):
        raise TypeError(COPY_REFUSED)

    def __reduce_ex__(self, protocol):
        raise TypeError(COPY_REFUSED)


def override_forward(module: nn.Module, make_forward: Callable[[Callable], Callable]) -> None:
    """Replace ``module.forward`` by ``make_forward(current_forward)``.

    Raises:
        RuntimeError: the module is already overridden (patching twice is an error).
    """
    if hasattr(module, _SAVED_FORWARD):
        raise RuntimeError(f"{type(module).__name__} already carries a pitome_mllm forward override")
    saved = module.__dict__.get("forward", _MISSING)
    current = module.forward
    object.__setattr__(module, _SAVED_FORWARD, _SavedForward(saved))
    module.forward = make_forward(current)


def restore_forward(module: nn.Module) -> None:
    """Undo `override_forward` (no-op on a module that is not overridden)."""
    if not hasattr(module, _SAVED_FORWARD):
        return
    saved = module.__dict__.pop(_SAVED_FORWARD).forward
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


def remove_hooks(handles: list) -> None:
    """Remove every ``torch.utils.hooks.RemovableHandle`` in ``handles`` and empty the list."""
    for handle in handles:
        handle.remove()
    handles.clear()


@contextlib.contextmanager
def undone_on_error(remove: Callable[[], None]) -> Iterator[None]:
    """Run an install; if it raises, call ``remove`` (which must cope with a partial install) first."""
    try:
        yield
    except BaseException:
        remove()
        raise

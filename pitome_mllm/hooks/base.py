"""The install / remove protocol every insertion point follows, and the reversible overrides they use.

`Hook` is one unit of change to a model or processor: ``install()`` puts it in,
``remove()`` takes out exactly what ``install()`` put in and is safe after a partial (or
no) install. An adapter lists its units in order; `install_in_order` installs them under
one rollback and `remove_in_reverse` takes them out last-first, so a unit that wraps what
an earlier one installed is always unwrapped first.

Forward overrides, in the spirit of accelerate's ``add_hook_to_module``: an override
replaces a module's ``forward`` with an instance attribute and records what was there,
so that `restore_forward` puts back exactly the previous state (including a forward that
another library, e.g. accelerate's device hooks, had already installed on the instance).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

from torch import nn

_SAVED_FORWARD = "_pitome_saved_forward"


class Hook(ABC):
    """One reversible change to a model or processor.

    ``install()`` makes the change; ``remove()`` undoes exactly that change and must be safe to
    call after a partial install, after a failed one and more than once. Wrappers a unit puts in
    place keep the wrapped function's name, doc and ``__wrapped__`` (``functools.wraps``).
    """

    @abstractmethod
    def install(self) -> None:
        """Make the change (on failure, `remove` is called and must cope with what was done)."""

    @abstractmethod
    def remove(self) -> None:
        """Undo `install` exactly; a no-op for whatever was not installed."""


def install_in_order(hooks: Sequence[Hook]) -> None:
    """Install ``hooks`` first to last under one rollback.

    If any ``install`` raises, that unit and every unit installed before it are removed, last
    first, and the error is raised again: the model and processor are left as they were.
    """
    installed: list[Hook] = []
    try:
        for hook in hooks:
            installed.append(hook)  # before install: a unit that fails half-way is removed too
            hook.install()
    except BaseException:
        remove_in_reverse(installed)
        raise


def remove_in_reverse(hooks: Sequence[Hook]) -> None:
    """Remove ``hooks`` last to first (the reverse of `install_in_order`)."""
    for hook in reversed(hooks):
        hook.remove()


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


PROCESSOR_COPY_REFUSED = (
    "a processor patched by pitome_mllm cannot be copied or pickled: its placeholder count belongs to the "
    "patched model, so a copy would keep emitting the merged count after unpatch. Call handle.unpatch(), "
    "copy or save the processor, then patch with the copy"
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


class AttributeOverrides(Hook):
    """Instance attributes of one object (a processor's counting methods, a model method) as a `Hook`.

    Args:
        target: the object whose instance attributes are set.
        build: ``() -> {name: value}``, called at install (so wrappers wrap what is there then);
            may raise before anything is set.
    """

    def __init__(self, target: object, build: Callable[[], dict[str, object]]) -> None:
        self.target = target
        self.build = build
        self._overrides = InstanceOverrides(target)

    def install(self) -> None:
        for name, value in self.build().items():
            self._overrides.set(name, value)

    def remove(self) -> None:
        self._overrides.restore()


_PROCESSOR_PATCH = "_pitome_processor_patch"


class _ProcessorPatchMark:
    """Sits in a patched processor's ``__dict__``: names the model it counts for, refuses copy and pickle.

    A copy would keep the merged count (and closures over the patched model) after ``unpatch()``;
    pickling would fail deep inside on a local function. Both are refused with the remedy instead.
    """

    __slots__ = ("model_name",)

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def __deepcopy__(self, memo: dict):
        raise TypeError(PROCESSOR_COPY_REFUSED)

    def __reduce_ex__(self, protocol):
        raise TypeError(PROCESSOR_COPY_REFUSED)


class ProcessorOverrides(AttributeOverrides):
    """`AttributeOverrides` on a processor, which only one patched model may own at a time.

    Two patches on one processor cannot both be right: each sets the count of its own model, and
    each would restore what it saved (the other's count) on removal. So a processor that already
    carries a patch is refused, naming both ways out; the mark that records the owner also makes a
    copy or pickle of the patched processor fail with a clear message.
    """

    def __init__(self, target: object, build: Callable[[], dict[str, object]], model_name: str) -> None:
        super().__init__(target, build)
        self.model_name = model_name
        self._marked = False

    def install(self) -> None:
        owner = self.target.__dict__.get(_PROCESSOR_PATCH)
        if owner is not None:
            raise RuntimeError(
                f"the {type(self.target).__name__} passed to patch() is already patched for another model "
                f"({owner.model_name}), whose placeholder count it now emits; either unpatch that model first "
                "(handle.unpatch()), or give each model its own processor (load it again, or copy.deepcopy it "
                "before patching)"
            )
        self.target.__dict__[_PROCESSOR_PATCH] = _ProcessorPatchMark(self.model_name)
        self._marked = True
        super().install()

    def remove(self) -> None:
        super().remove()
        if self._marked:
            self.target.__dict__.pop(_PROCESSOR_PATCH, None)
            self._marked = False


def is_processor_patched(processor: object) -> bool:
    """Whether ``processor`` carries a pitome_mllm placeholder-count patch."""
    return _PROCESSOR_PATCH in getattr(processor, "__dict__", {})


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

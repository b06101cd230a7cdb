"""`patch()` / `patched()`: the public entry point, and the handle that undoes it."""

from __future__ import annotations

import contextlib
import logging
import numbers
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import PiToMeConfig, shown
from .hooks.base import COPY_REFUSED, is_overridden
from .hooks.observers import Observer, ObserverHandle
from .models import ModelParts, find_adapter
from .models.compat import warn_if_untested_transformers

_HANDLE_ATTR = "_pitome_patch_handle"
SIGNATURE = "pitome_mllm.patch(model, processor=None, config=None, **overrides)"
logger = logging.getLogger("pitome_mllm")


def _check_arguments(model, processor, config) -> None:
    """TypeErrors for arguments in the wrong place, before anything else looks at them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{SIGNATURE}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(processor, (numbers.Number, str, dict, PiToMeConfig)):
        raise TypeError(
            f"{SIGNATURE}: processor must be the model's processor or None, got {type(processor).__name__} "
            f"{shown(processor)}; pass settings by keyword (keep_ratio=0.9) or as config="
        )
    if config is not None and not isinstance(config, (PiToMeConfig, dict)):
        hint = ""
        if isinstance(config, numbers.Real) and not isinstance(config, bool):
            hint = f"; for a keep ratio write keep_ratio={shown(config)}"
        elif isinstance(config, str):
            hint = f"; for a method or preset write method={shown(config, 60)} or preset={shown(config, 60)}"
        raise TypeError(
            f"{SIGNATURE}: config must be a PiToMeConfig, a dict or None, "
            f"got {type(config).__name__} {shown(config)}{hint}"
        )


class PatchHandle:
    """A live patch on a model (and its processor).

    Attributes:
        model, processor, config: what was patched, with which settings.
        num_visual_tokens: visual tokens per image the language model receives
            (for the model's native image size), known before the model runs.
        keep_ratio: the keep ratio the vision tower uses (solved when only
            ``target_tokens`` was given).
    """

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig, adapter) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self._adapter = adapter
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    @property
    def family(self) -> str:
        return self._adapter.family

    @property
    def num_visual_tokens(self) -> int:
        return self._adapter.num_visual_tokens

    @property
    def keep_ratio(self) -> float:
        return self._adapter.tower_keep_ratio

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Image placeholders the prompt needs for one ORIGINAL image of ``height x width`` pixels.

        The size of the image as the user has it (PIL ``image.size[::-1]``), before the processor:
        the family's own resize rule is applied (LLaVA-1.5: shortest edge and centre crop of the
        patched processor's image processor, or the tower's native size when patched without a
        processor; LLaVA-NeXT / OneVision: anyres on the original size), so the answer equals the
        count the patched processor emits.

        Raises:
            ValueError: ``height`` or ``width`` is not a positive integer.
        """
        return self._adapter.visual_tokens_for_image(height, width)

    @property
    def schedule(self):
        """The `LayerStep` of every vision layer the model reads, for the native image size."""
        return list(self._adapter.plan(self._adapter.default_num_tokens))

    @property
    def trace(self):
        """`MergeTrace` of the last vision-tower forward (source map, sizes, counts), or None."""
        return self._adapter.state.trace

    @property
    def final_token_map(self):
        """``[num_images, num_patches]``: the LLM token holding each patch, after the last forward."""
        return self._adapter.state.final_token_map

    @property
    def final_size(self):
        """``[num_images, num_visual_tokens, 1]``: patches each LLM visual token holds, after the last forward."""
        return self._adapter.state.final_size

    def record_merges(self, enabled: bool = True) -> None:
        """Keep every step's `Merge` of the next forwards in ``trace.merges`` (for visualisation)."""
        self._adapter.record_merges(enabled)

    def add_observer(self, observer: Observer) -> ObserverHandle:
        """Tell ``observer`` (a `pitome_mllm.hooks.observers.Observer`) about every merge stage.

        Returns a handle whose ``remove()`` detaches it; `unpatch` detaches every observer.
        """
        return self._adapter.state.observers.add(observer)

    @property
    def parts(self) -> ModelParts:
        """The model's vision tower, projector, feature layer, ... (`pitome_mllm.models.ModelParts`)."""
        return self._adapter.parts(self.model)

    def summary(self) -> dict[str, Any]:
        steps = self.schedule
        return {
            "family": self.family,
            "config": self.config.to_dict(),
            "keep_ratio": self.keep_ratio,
            "num_visual_tokens": self.num_visual_tokens,
            "tokens_after_layer": [step.tokens_out for step in steps],
            "methods": [step.method for step in steps],
        }

    def unpatch(self) -> None:
        """Restore the model and processor exactly as they were. Idempotent."""
        if not self._active:
            return
        self._adapter.remove()
        self._adapter.state.observers.clear()
        self.model.__dict__.pop(_HANDLE_ATTR, None)
        self._active = False

    def __enter__(self) -> PatchHandle:
        return self

    # The handle sits in the model's __dict__: copying or pickling the model meets it here.
    def __deepcopy__(self, memo: dict):
        raise TypeError(COPY_REFUSED)

    def __reduce_ex__(self, protocol):
        raise TypeError(COPY_REFUSED)

    def __exit__(self, *exc_info) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (
            f"PatchHandle({self.family}, method={self.config.method!r}, preset={self.config.preset!r}, "
            f"keep_ratio={self.keep_ratio:.4f}, num_visual_tokens={self.num_visual_tokens}, {state})"
        )


def get_patch(model: nn.Module) -> PatchHandle | None:
    """The active handle of a patched model, or None."""
    return model.__dict__.get(_HANDLE_ATTR)


def patch(model: nn.Module, processor=None, config: PiToMeConfig | dict | None = None, **overrides: Any) -> PatchHandle:
    """Put token merging into ``model`` (in place) and make ``processor`` emit the new token count.

    Args:
        model: a supported model (see `pitome_mllm.models.supported_families`).
        processor: its processor; after patching it emits ``handle.num_visual_tokens``
            image placeholders per image. None: build the prompts yourself.
        config: a `PiToMeConfig` (or its dict); keyword ``overrides`` change fields of it,
            e.g. ``patch(model, processor, keep_ratio=0.9)`` or ``target_tokens=128``.

    Returns:
        A `PatchHandle`; ``handle.unpatch()`` restores everything.

    Raises:
        TypeError: an argument of the wrong kind (e.g. ``patch(model, processor, 0.9)``);
            the message names the signature.
        ValueError: a bad config value, an unsupported model, or a budget the model
            cannot reach. The model is left untouched.
        RuntimeError: the model is already patched.
    """
    _check_arguments(model, processor, config)
    warn_if_untested_transformers()
    if get_patch(model) is not None:
        raise RuntimeError("model is already patched; call handle.unpatch() (pitome_mllm.get_patch(model)) first")
    if isinstance(config, dict):
        config = PiToMeConfig.from_dict(config)
    if config is None:
        config = PiToMeConfig.from_dict(overrides)  # unknown keys: ValueError naming the allowed ones
    elif overrides:
        config = config.replace(**overrides)
    # Construction checks the config against what the family declares, validates and plans; no mutation yet.
    adapter = find_adapter(model)(model, processor, config)
    if any(is_overridden(layer) for layer in adapter.layers):
        raise RuntimeError("the vision tower already carries a pitome_mllm patch")
    adapter.install()
    handle = PatchHandle(model, processor, config, adapter)
    model.__dict__[_HANDLE_ATTR] = handle
    if processor is None and adapter.processor_counts_placeholders:
        warnings.warn(
            f"patched {type(model).__name__} without its processor: prompts must now carry "
            f"handle.num_visual_tokens={adapter.num_visual_tokens} image placeholders per image "
            "(handle.visual_tokens_for_image(h, w) for other sizes); pass the processor to patch() "
            "to have it emit them",
            UserWarning,
            stacklevel=2,
        )
    return handle


@contextlib.contextmanager
def patched(
    model: nn.Module, processor=None, config: PiToMeConfig | dict | None = None, **overrides: Any
) -> Iterator[PatchHandle]:
    """Context manager: ``with patched(model, processor, keep_ratio=0.9) as handle: ...``."""
    handle = patch(model, processor, config, **overrides)
    try:
        yield handle
    finally:
        handle.unpatch()

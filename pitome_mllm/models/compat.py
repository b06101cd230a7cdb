"""Differences between the transformers releases the adapters support, and which releases those are
(`TESTED_TRANSFORMERS_MINORS`: 4.57.x and 5.16 → 5.25).

Each shim names the releases it is for; code outside `pitome_mllm.models` asks the adapter,
never this module, so a new release changes one file. The one exception is `patch()`'s call of
`warn_if_untested_transformers`.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
import transformers

# The transformers releases CI runs the adapters on, per major line: (lowest minor, highest minor). The one place
# that says so: pyproject's lower bounds, README and .ci/run's matrix follow it. Releases after these install
# (no upper cap) and patch() warns once that they are untested.
TESTED_TRANSFORMERS_MINORS = {4: (57, 57), 5: (16, 25)}
TESTED_TRANSFORMERS = ", ".join(
    f"{major}.{low}.x" if low == high else f"{major}.{low} → {major}.{high}"
    for major, (low, high) in TESTED_TRANSFORMERS_MINORS.items()
)
_untested_warning_given = False


def transformers_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed transformers (``"5.19.0.dev0"`` -> ``(5, 19)``)."""
    major, minor = re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()
    return int(major), int(minor)


def transformers_version_text() -> str:
    return transformers.__version__


def is_tested_transformers(version: tuple[int, int]) -> bool:
    """Whether ``(major, minor)`` is a transformers release CI runs the adapters on."""
    major, minor = version
    low, high = TESTED_TRANSFORMERS_MINORS.get(major, (1, 0))
    return low <= minor <= high


def warn_if_untested_transformers() -> None:
    """One `UserWarning` per process when the installed transformers is outside the tested releases."""
    global _untested_warning_given
    if _untested_warning_given or is_tested_transformers(transformers_version()):
        return
    _untested_warning_given = True
    warnings.warn(
        f"transformers {transformers_version_text()} is not among the releases pitome-mllm is tested with "
        f"({TESTED_TRANSFORMERS}); patching may fail or merge differently. Report what breaks, or install a "
        "tested release",
        UserWarning,
        stacklevel=3,
    )


def encoder_layers_return_tuple() -> bool:
    """transformers 4.x CLIP / SigLIP encoder layers return ``(hidden_states, attn_weights?)`` and the
    encoder reads ``[0]``; from 5.0 they return the hidden-states tensor itself."""
    return transformers_version()[0] < 5


@functools.cache
def mask_sizes_take_positions(cache_class: type) -> bool:
    """Whether ``cache_class.get_mask_sizes`` takes ``cache_position`` (4.57) rather than a query length (5.x).

    Asked once per cache class: the answer is needed in every attention call of every layer.
    """
    return "cache_position" in inspect.signature(cache_class.get_mask_sizes).parameters


def cache_mask_sizes(cache, layer_idx: int, q_length: int) -> tuple[int, int]:
    """``(kv_length, kv_offset)`` of the keys layer ``layer_idx`` will see for ``q_length`` new queries.

    Read from a transformers ``Cache`` before the layer updates it (`pitome_mllm.hooks.llm_attention.MaskSizes`).
    """
    if mask_sizes_take_positions(type(cache)):
        # transformers 4.57: get_mask_sizes(cache_position, layer_idx) reads only the positions' count.
        return cache.get_mask_sizes(torch.arange(q_length), layer_idx)
    return cache.get_mask_sizes(q_length, layer_idx)  # transformers 5.x: get_mask_sizes(query_length, layer_idx)

"""Differences between the transformers releases the adapters support (4.57.x and 5.16 → 5.24).

Each shim names the releases it is for; code outside `pitome_mllm.models` asks the adapter,
never this module, so a new release changes one file.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
import transformers

TESTED_TRANSFORMERS = "4.57.x, 5.16 → 5.24"


def transformers_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed transformers (``"5.19.0.dev0"`` -> ``(5, 19)``)."""
    major, minor = re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()
    return int(major), int(minor)


def transformers_version_text() -> str:
    return transformers.__version__


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

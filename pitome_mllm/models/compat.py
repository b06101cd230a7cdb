"""Differences between the transformers releases the adapters support (4.57.x and 5.16 → 5.24).

Each shim names the releases it is for; code outside `pitome_mllm.models` asks the adapter,
never this module, so a new release changes one file.
"""

from __future__ import annotations

import re

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

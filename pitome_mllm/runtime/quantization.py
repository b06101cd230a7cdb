"""bitsandbytes settings that quantise the language model only."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch


def bitsandbytes_config(
    load_in_4bit: bool,
    load_in_8bit: bool,
    compute_dtype: torch.dtype,
    skip_modules: Sequence[str],
    four_bit_options: dict[str, Any] | None = None,
):
    """A ``BitsAndBytesConfig`` that leaves ``skip_modules`` unquantised, or None when not quantising.

    Args:
        skip_modules: module names kept in full precision (the model family's vision tower,
            projector and head: quantising the projector would change the features the
            merges are decided on).
        four_bit_options: more ``BitsAndBytesConfig`` keywords for 4-bit loading.

    Raises:
        ValueError: both 4- and 8-bit were asked for.
        ImportError: bitsandbytes is not installed.
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit, not both")
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        bits = 4 if load_in_4bit else 8
        raise ImportError(
            f"load_in_{bits}bit needs bitsandbytes: pip install 'pitome-mllm[quant]' (or pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(skip_modules),
            **(four_bit_options or {}),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))

"""The model arguments of the lmms-eval plugin, parsed and checked in one place (no torch, no lmms-eval).

The plugin's constructor (`base.PiToMeLmmsModel`) and the sweep's suite check
(`pitome_mllm.experiments.sweep.schema`) both call `check_loader_arguments`, so a value the plugin
would refuse as a run starts is refused when the suite is read. lmms-eval hands the values over as
its ``model_args`` parser leaves them (``"1"`` -> 1, ``"true"`` -> True, other words as strings);
a suite file gives them as YAML scalars.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...common.prompts import PROMPT_FORMATS
from ...config import DTYPES, shown

LOGLIKELIHOOD_VALUES = ("loss", "logprob")
_NONE_WORDS = ("none", "null", "")
# Arguments read as true / false.
BOOLEAN_ARGUMENTS = ("load_in_4bit", "load_in_8bit", "use_cache")


def is_unset(value: Any) -> bool:
    """None, or a word lmms-eval users write for it (``none``, ``null``, empty)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def parse_bool(name: str, value: Any) -> bool:
    """``True`` / ``False`` from lmms-eval's model_args (already bools, or strings / 0 / 1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {shown(value)}")


def parse_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _parse_number(name, value, int, (int,), "an integer")


def parse_float(name: str, value: Any) -> float:
    return _parse_number(name, value, float, (int, float), "a number")


def _parse_number(name: str, value: Any, convert: Callable[[Any], Any], accepted: tuple[type, ...], kind: str):
    """``convert(value)`` for a value of an ``accepted`` type (never a bool) or a string that converts."""
    if isinstance(value, accepted) and not isinstance(value, bool):
        return convert(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return convert(value.strip())
    raise ValueError(f"{name} must be {kind}, got {shown(value)}")


def parse_positive_int(name: str, value: Any) -> int:
    number = parse_int(name, value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {shown(value)}")
    return value


def check_record_path(value: Any) -> Path:
    """The ``record`` file, checked before the model loads: not a folder, in a folder that can be written."""
    path = Path(str(value))
    if path.is_dir():
        raise ValueError(f"record={shown(str(value))} is a folder; give the path of a JSON file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the record's folders are created when it is written
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"record={shown(str(value))}: {folder} is not a writable folder")
    return path


def check_loader_arguments(arguments: dict[str, Any]) -> None:
    """Every loading and generation argument in ``arguments`` that the plugin checks, by name.

    Raises:
        ValueError: naming the argument, its value (cut) and what is allowed.
    """
    checks: dict[str, Callable[[str, Any], Any]] = {
        "dtype": lambda name, value: check_choice(name, value, DTYPES),
        "loglikelihood": lambda name, value: check_choice(name, value, LOGLIKELIHOOD_VALUES),
        "prompt_format": lambda name, value: check_choice(name, value, PROMPT_FORMATS),
        "max_new_tokens": parse_positive_int,
        "batch_size": _parse_batch_size,
        "record": lambda name, value: None if is_unset(value) else check_record_path(value),
        **dict.fromkeys(BOOLEAN_ARGUMENTS, parse_bool),
    }
    for name, check in checks.items():
        if name in arguments:
            check(name, arguments[name])
    quantized = [name for name in ("load_in_4bit", "load_in_8bit") if parse_bool(name, arguments.get(name, False))]
    if len(quantized) > 1:
        raise ValueError("load_in_4bit and load_in_8bit exclude each other; set one of them")


def _parse_batch_size(name: str, value: Any) -> int:
    if str(value).startswith("auto"):
        raise ValueError(f"{name} 'auto' is not supported by the pitome_mllm models; pass an integer")
    return parse_positive_int(name, value)

"""The suite file's schema: every check a suite passes before the sweep starts anything.

A suite is shared and edited by hand, so the sweep trusts none of it: each problem is one
`SuiteError` line naming the file, the key, the bad value and what is allowed. Task and run
names become folder names under ``--output``, so they are restricted to `SAFE_NAME` and the
folders they make are checked to stay inside it (`inside`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ...config import SHOWN_CHARACTERS, shown

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,119}")
SAFE_NAME_HELP = "letters, digits and _ . + - (starting with a letter or digit, at most 120)"
SUITE_KEYS = {
    "name",
    "description",
    "lmms_model",
    "tasks",
    "model_args",
    "runs",
    "baseline",
    "batch_size",
    "include_path",
    "notes",
}
# Arguments of the plugin's models besides the PiToMeConfig fields; a test keeps these in step with
# the classes' __init__ (importing the plugin here would import torch and lmms-eval); pitome_llava_hf's
# (PiToMeLlavaHF), then the Qwen-VL models' at the end of this file:
LOADER_ARGS = {
    "pretrained",
    "device",
    "device_map",
    "dtype",
    "attn_implementation",
    "load_in_4bit",
    "load_in_8bit",
    "batch_size",
    "max_new_tokens",
    "prompt_format",
    "use_cache",
    "loglikelihood",
    "record",
    "max_batch_size",
}
# Keys a suite may not set: the sweep sets them for every run (lmms-eval hands its --batch_size to the
# model too, so a batch_size model argument would be given twice).
RESERVED_MODEL_ARGS = {"pretrained", "record", "batch_size"}
# Where a suite sets what a reserved key would.
RESERVED_HINTS = {"batch_size": " (set the suite's top-level batch_size, or --batch-size)"}
# A suite is a small hand-written file; anything larger is refused before it is parsed.
MAX_SUITE_BYTES = 1 << 20
SCALARS = (str, int, float, bool, type(None))


class SuiteError(ValueError):
    """A suite (or a sweep argument) that cannot run; the message is one line for the user."""


def _kind(value: Any) -> str:
    if isinstance(value, (dict, list)) and not value:
        return "an empty mapping" if isinstance(value, dict) else "an empty list"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}
    return names.get(type(value), f"a {type(value).__name__}")


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def compose_node(self, parent, index):
            # An alias repeats a whole subtree: a few hundred bytes can expand to gigabytes.
            if self.check_event(yaml.events.AliasEvent):
                problem = "aliases (*name) are not allowed in a suite; write the values out"
                raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)
            return super().compose_node(parent, index)

    return UniqueKeyLoader


def read_yaml(path: Path) -> Any:
    """The parsed file; YAML errors (and tags such as ``!!python/object``) become one line."""
    import yaml

    try:
        size = path.stat().st_size
        if size > MAX_SUITE_BYTES:
            raise SuiteError(f"{path}: {size} bytes is not a suite file (at most {MAX_SUITE_BYTES} bytes)")
        return yaml.load(path.read_text(), Loader=_unique_key_loader())  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = str(getattr(error, "problem", None) or str(error).splitlines()[0])[:SHOWN_CHARACTERS]
        raise SuiteError(f"{path}: {where}not valid suite YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SuiteError(f"{path}: cannot read it ({error})") from None


def check_name(path: Path, key: str, name: Any) -> str:
    """``name`` as a folder name, or a `SuiteError` (no separators, no ``..``, no hidden files)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise SuiteError(f"{path}: {key} {shown(name)} is not a valid name; use {SAFE_NAME_HELP}")
    return name


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, or a `SuiteError` when it leaves ``root`` (through ``..`` or a symlink)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise SuiteError(f"{path} resolves to {resolved}, outside the sweep folder {root.resolve()}")
    return resolved


def refuse_link(path: Path) -> Path:
    """``path``, or a `SuiteError` when it is a symbolic link: the sweep writes nothing through one."""
    if path.is_symlink():
        raise SuiteError(
            f"{path} is a symbolic link (to {os.readlink(path)}); the sweep does not write through links: "
            "remove it, or use another --output"
        )
    return path


def _no_follow(file: str, flags: int) -> int:
    return os.open(file, flags | os.O_NOFOLLOW, 0o644)


def open_for_writing(path: Path, mode: str = "w", **kwargs: Any):
    """``open(path, mode)`` that refuses a symbolic link at ``path`` (checked, and ``O_NOFOLLOW`` for a race)."""
    return open(refuse_link(path), mode, opener=_no_follow, **kwargs)


def check_tasks(path: Path, tasks: Any) -> dict[str, str]:
    if not isinstance(tasks, dict) or not tasks:
        raise SuiteError(
            f"{path}: 'tasks' must map each lmms-eval task to its metric, e.g. gqa: exact_match,none; "
            f"got {_kind(tasks)}"
        )
    checked = {}
    for task, metric in tasks.items():
        check_name(path, "task", task)
        # lmms-eval keys its results "<metric>,<filter>"; anything else can never be read back.
        if not isinstance(metric, str) or "," not in metric or not all(part.strip() for part in metric.split(",", 1)):
            raise SuiteError(
                f"{path}: tasks.{task} is {shown(metric)}; it must name the metric as '<metric>,<filter>', "
                "e.g. exact_match,none"
            )
        checked[task] = metric
    return checked


def check_model_args(where: str, arguments: Any, known: set[str], *, sweepable: bool) -> dict[str, Any]:
    """A mapping of known model arguments to scalars (lists of scalars where ``sweepable``).

    ``where`` starts every message, e.g. ``"suite.yaml: runs.pitome"`` or ``"--model-args"``.
    """
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise SuiteError(f"{where} must be a mapping of model arguments, e.g. {{method: none}}; got {_kind(arguments)}")
    reserved = sorted(RESERVED_MODEL_ARGS & set(arguments))
    if reserved:
        hints = "".join(RESERVED_HINTS.get(name, "") for name in reserved)
        raise SuiteError(f"{where} may not set {reserved}; the sweep sets them{hints}")
    unknown = sorted(set(map(str, arguments)) - known)
    if unknown:
        allowed = sorted(known - RESERVED_MODEL_ARGS)
        raise SuiteError(f"{where} has unknown model arguments {unknown}; allowed: {allowed}")
    for name, value in arguments.items():
        values = value if sweepable and isinstance(value, list) else [value]
        if sweepable and isinstance(value, list) and not value:
            raise SuiteError(f"{where}.{name} is an empty list, so this run would expand to nothing; give values")
        for item in values:
            if not isinstance(item, SCALARS):
                allowed = "a value or a list of values" if sweepable else "a value (lists only inside runs)"
                raise SuiteError(f"{where}.{name} is {_kind(item)} ({shown(item)}); it must be {allowed}")
            # lmms-eval splits model_args on ',' and '='; such characters would silently corrupt a run.
            if "," in str(item) or "=" in str(item):
                raise SuiteError(f"{where}.{name}={shown(str(item))} may not contain ',' or '='")
    return {str(name): value for name, value in arguments.items()}


def check_runs(path: Path, runs: Any, known: set[str]) -> dict[str, dict[str, Any]]:
    if not isinstance(runs, dict) or not runs:
        raise SuiteError(
            f"{path}: 'runs' must map run names to model arguments, e.g. none: {{method: none}}; got {_kind(runs)}"
        )
    return {
        check_name(path, "run", name): check_model_args(f"{path}: runs.{name}", arguments or {}, known, sweepable=True)
        for name, arguments in runs.items()
    }


def check_batch_size(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SuiteError(f"{where} is {shown(value)}; it must be a whole number >= 1")
    return value


def check_limit(where: str, value: Any) -> int | float | None:
    """lmms-eval's ``--limit``: documents per task (a whole number >= 1) or a fraction in (0, 1); None: all."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1 or value >= 1):
        raise SuiteError(f"{where} is {shown(value)}; it must be a whole number >= 1 or a fraction in (0, 1)")
    if value >= 1:
        if not float(value).is_integer():
            raise SuiteError(f"{where} is {value}; above 1 it counts documents, so it must be a whole number")
        return int(value)
    return float(value)


def check_include_path(path: Path, value: Any) -> Path | None:
    """The folder of extra lmms-eval tasks, relative to the suite file."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SuiteError(
            f"{path}: include_path is {shown(value)}; it must be a folder path (relative to the suite file)"
        )
    folder = (path.parent / value).resolve()
    if not folder.is_dir():
        raise SuiteError(f"{path}: include_path {shown(value)} is not a folder (looked for {folder})")
    return folder


def check_unique_run_ids(path: Path, run_ids: list[tuple[str, str]]) -> None:
    """``(run_id, run name)`` pairs of one task: two runs sharing a folder would overwrite each other."""
    owner: dict[str, str] = {}
    for run_id, name in run_ids:
        if run_id in owner:
            raise SuiteError(
                f"{path}: runs {owner[run_id]!r} and {name!r} both expand to run id {run_id!r}; rename one of them"
            )
        owner[run_id] = name


# pitome_qwen2_5_vl and pitome_qwen3_vl (PiToMeQwenVL): no prompt_format; the processor's pixel bounds.
QWEN_LOADER_ARGS = (LOADER_ARGS - {"prompt_format"}) | {"min_pixels", "max_pixels", "system_prompt"}
# The lmms-eval models a suite may run (its ``lmms_model``, default the first) and the arguments each takes.
MODEL_LOADER_ARGS = {
    "pitome_llava_hf": LOADER_ARGS,
    "pitome_qwen2_5_vl": QWEN_LOADER_ARGS,
    "pitome_qwen3_vl": QWEN_LOADER_ARGS,
}


def check_lmms_model(path: Path, value: Any) -> str:
    """The suite's lmms-eval model name (``lmms_model``), one of `MODEL_LOADER_ARGS`."""
    if value not in MODEL_LOADER_ARGS:
        raise SuiteError(f"{path}: lmms_model is {value!r}; it must be one of {sorted(MODEL_LOADER_ARGS)}")
    return value

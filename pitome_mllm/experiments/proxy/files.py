"""Files of the proxies: atomic writes, cached tensors, resumable result rows and the per-seed folders.

Everything a proxy writes goes through `atomic_write_bytes`, so an interrupted run leaves the
previous file or the new one, never half of one; that is what makes every proxy resumable.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("pitome_mllm")

SEED_FOLDER = "seed{seed}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def cached_tensor(path: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once; later calls read it from ``path`` (written atomically)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return value


def load_finished_rows(path: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run in ``path`` with the same ``identity``; [] if none or another identity.

    A file from a different run (another dataset, counts or seed) is kept as
    ``<name>.previous.json`` rather than overwritten.
    """
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; starting afresh", path)
        return []
    if report.get("identity") != identity:
        backup = path.with_name(path.stem + ".previous.json")
        logger.warning("%s holds another run (%s); moved to %s", path, report.get("identity"), backup)
        os.replace(path, backup)
        return []
    return list(report.get("rows", []))


def seed_folder(output: Path, seed: int) -> Path:
    """``OUTPUT/seed<N>``: the results of one seed of a multi-seed proxy run."""
    return Path(output) / SEED_FOLDER.format(seed=seed)

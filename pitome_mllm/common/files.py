"""Where the package keeps its files, and how it writes them so a reader never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir(create: bool = True) -> Path:
    """``$PITOME_CACHE`` or ``~/.cache/pitome_mllm`` (created unless ``create=False``: a dry run writes nothing)."""
    folder = Path(os.environ.get("PITOME_CACHE", Path.home() / ".cache" / "pitome_mllm"))
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename it, so readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # default=str: a stray non-JSON value (a dtype, a path) is recorded as text rather than losing the file.
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    # O_NOFOLLOW: a link planted at the temporary name must not be written through.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with open(descriptor, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def checked_output_folder(flag: str, folder: str | Path) -> Path:
    """``folder``, created and writable, before any work starts; a ValueError naming ``flag`` otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {folder}: cannot create the folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: the folder is not writable")
    return folder

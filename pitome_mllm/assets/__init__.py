"""Small public-domain / CC0 photographs bundled for the offline demo and the tests.

Sources and licences are listed in ``README.md`` next to this file.  Only PIL is imported here, so
loading a demo image does not pull in torch or transformers.
"""

from __future__ import annotations

import importlib.resources
from pathlib import PurePath
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["list_images", "load_image"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _image_files() -> dict[str, Traversable]:
    """Map image name (file stem) -> bundled file, found through importlib.resources so zipped installs work."""
    assets = importlib.resources.files(__name__)
    return {
        PurePath(entry.name).stem: entry
        for entry in assets.iterdir()
        if entry.is_file() and entry.name.lower().endswith(_IMAGE_SUFFIXES)
    }


def list_images() -> list[str]:
    """Names of the bundled photographs, sorted, e.g. ``["astronaut", "chelsea", "coffee"]``."""
    return sorted(_image_files())


def load_image(name: str = "astronaut") -> Image.Image:
    """Load a bundled photograph as an RGB ``PIL.Image.Image`` (at most 336 px on the long side).

    Raises:
        ValueError: ``name`` is not a bundled image; the message lists the available names.
    """
    files = _image_files()
    if name not in files:
        raise ValueError(f"unknown image {name!r}; available images: {', '.join(sorted(files))}")
    with files[name].open("rb") as stream:
        # convert() decodes the pixels now, while the file is still open (PIL decodes lazily).
        return Image.open(stream).convert("RGB")

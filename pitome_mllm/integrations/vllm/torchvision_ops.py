"""Lets a torchvision whose compiled operators cannot load import anyway (CPU torch beside a CUDA torchvision).

vLLM's CPU build installs PyPI's torchvision, a CUDA build whose ``_C`` library needs
``libc10_cuda.so``. torchvision then fails at import (``operator torchvision::nms does not
exist``: its fake-tensor registrations name operators the library never defined), and with it
``from transformers import ...`` of anything that checks for torchvision, vLLM's LLaVA included
(it imports transformers' Pixtral image processor, which needs ``torchvision.transforms.v2``).
Only torchvision's compiled operators (nms, roi_align, ...) are missing; none of them runs in
LLaVA serving, and transforms are pure Python.

`install` (run at interpreter start by the ``.pth`` file ``scripts/install.sh --vllm`` writes)
adds an import hook: the first ``import torchvision`` first tries to load the compiled library
itself, and only where that fails declares the two operator schemas torchvision registers fake
kernels for, so the import goes through. Calling a compiled operator still fails, loudly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# Operators torchvision registers with ``torch.library.register_fake`` at import (the others are
# skipped when the library is missing); their schemas as torchvision declares them.
FAKE_REGISTERED_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list = []  # the torch.library.Library holding the declarations (kept alive)


def compiled_library_loads(package_folder: Path) -> bool:
    """Whether torchvision's compiled operator library loads beside this torch (it stays loaded)."""
    import torch

    for library in sorted(package_folder.glob("_C*.so")) + sorted(package_folder.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(library))
            return True
        except OSError:
            return False
    return False


def declare_missing_operators() -> None:
    """Declare the schemas torchvision needs at import, once."""
    import torch

    if _declared:
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in FAKE_REGISTERED_SCHEMAS:
        library.define(schema)
    _declared.append(library)


def prepare_torchvision() -> None:
    """Make the coming ``import torchvision`` work, whether or not its compiled library loads."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    if not compiled_library_loads(Path(spec.origin).parent):
        declare_missing_operators()


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs `prepare_torchvision` just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        prepare_torchvision()
        return None  # the normal finders import it


def install() -> None:
    """Put the import hook in place (cheap: imports nothing until torchvision is imported)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionImportHook())

"""Importing the repository's benchmark scripts (``benchmarks/NAME.py``, not a package) in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark_script(name: str) -> ModuleType:
    """``benchmarks/{name}.py`` imported as module ``name`` (registered in ``sys.modules``, as dataclasses need).

    Raises:
        FileNotFoundError: no such script (an installed package without the repository's ``benchmarks/``).
    """
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark script (the tests run from a clone of the repository)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

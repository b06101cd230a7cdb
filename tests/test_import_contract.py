"""The layering of the package, checked on the import statements of every module.

Layers, lowest first (a module may import its own layer and the ones below it):

    config, schedule           names, validated settings, token arithmetic (no torch)
    merge/                     the algorithms on tensors (no transformers, no nn.Module)
    hooks/                     reversible insertion points on generic modules
    models/                    the adapters: the only place that knows model attribute paths
    everything else            api, runtime/, tools/, integrations/, experiments/, testing/, cli/

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pitome_mllm"
LAYERS = {"config": 0, "schedule": 0, "merge": 1, "hooks": 2, "models": 3}
TOP = 4  # every other module of the package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of a ``pitome_mllm.*`` module (``pitome_mllm`` itself: the top)."""
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def imports_of(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (``from X import y`` gives ``X`` and ``X.y``)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.append(source)
            names += [f"{source}.{alias.name}" for alias in node.names]
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_modules_in_every_layer():
    layers = {layer_of(module_name(path)) for path in MODULES}
    assert layers == {0, 1, 2, 3, TOP}


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_no_module_imports_a_layer_above_its_own(path):
    own = layer_of(module_name(path))
    upward = sorted({name for name in imports_of(path) if name.startswith("pitome_mllm.") and layer_of(name) > own})
    assert upward == [], f"{module_name(path)} (layer {own}) imports from above: {upward}"


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(module_name(p)) <= LAYERS["merge"]], ids=module_name)
def test_config_schedule_and_merge_import_no_transformers(path):
    assert not [name for name in imports_of(path) if name.split(".")[0] == "transformers"]


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(module_name(p)) == 0], ids=module_name)
def test_config_and_schedule_import_no_torch(path):
    assert not [name for name in imports_of(path) if name.split(".")[0] in ("torch", "numpy")]


def test_importing_config_and_schedule_loads_neither_torch_nor_transformers():
    # A fresh interpreter: this one has imported torch already.
    code = (
        "import sys\n"
        "import pitome_mllm, pitome_mllm.config, pitome_mllm.schedule\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_model_attribute_paths_appear_only_in_models_and_testing():
    """Where LLaVA keeps its parts is the adapters' knowledge (and the builders' that make models)."""
    internals = ("multi_modal_projector", "get_image_features", "mm_projector", "get_vision_tower")
    outside = [
        module_name(path)
        for path in MODULES
        if module_name(path).split(".")[1:2] not in (["models"], ["testing"], ["zoo"])
        and any(f".{name}" in path.read_text() for name in internals)
    ]
    assert outside == []

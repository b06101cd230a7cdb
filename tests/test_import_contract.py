"""The layering of the package, checked on the import statements of every module.

Layers, lowest first (a module may import its own layer and the ones below it):

    core
    0  config, methods,        names, the method registry, validated settings,
       schedule, geometry      token arithmetic, an image's size -> grid -> counts (no torch)
    1  merge/                  the algorithms on tensors (no transformers, no nn.Module)
    2  hooks/                  reversible insertion points on generic modules
    3  models/                 the adapters: the only place that knows model attribute paths
    4  api, pitome_mllm        patch / patched / get_patch (the package root re-exports them)
    outer ring
    5  common/, assets/        plumbing (cache folder, atomic writes, prompts) and the bundled images
    6  zoo/                    the models the package builds (tiny LLaVAs, real architectures, real tower)
    7  runtime/                loading checkpoints and images, the terminal: loads zoo models by name
    8  tools/                  measure and show a model (profiling, visualisation, spectra): runs models
    9  integrations/, lmms_eval_manifest
                               lmms-eval model classes and the vLLM plugin: wrap a loaded, patched model
    10 experiments/            proxy benchmarks and the sweep: run integrations-free evaluations with tools
    11 web/                    the web page: one loaded model compared unpatched and patched, or a server's answers
    12 cli/                    the ``pitome-mllm`` commands: parse, call the layers below, print
    13 testing/                helpers only tests and benchmarks use (production code never imports it)

Why this order: each outer folder is built from the ones below it: the zoo builds its models
with the adapters' knowledge and the common cache, runtime loads zoo models by name, tools run
what runtime loads, integrations wrap patched models for other programs, experiments drive
tools, the web page shows what runtime and tools measure, the CLI drives everything, and testing
sits on top so no shipped code can depend on it.
A module the table does not name (a new top-level module or folder) sits on the highest layer
it imports from, so a new low-level module may be used by the core without editing this file.

Besides the order, no two files and no two folders may import each other, directly or
through others (a strongly connected component of more than one module): a cycle makes
import order matter and hides which of the two is the lower one.

Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pitome_mllm"
LAYERS = {
    "config": 0,
    "methods": 0,
    "schedule": 0,
    "geometry": 0,
    "merge": 1,
    "hooks": 2,
    "models": 3,
    "": 4,  # the package root, pitome_mllm/__init__.py
    "api": 4,
    "common": 5,
    "assets": 5,
    "zoo": 6,
    "runtime": 7,
    "tools": 8,
    "integrations": 9,
    "lmms_eval_manifest": 9,
    "experiments": 10,
    "web": 11,
    "cli": 12,
    "testing": 13,
}
CORE_TOP = LAYERS["api"]
# Where model families keep their parts: only the adapters (models/) and the code that builds
# models (zoo/, testing/) may name them. Read through `ModelParts` everywhere else.
MODEL_ATTRIBUTES = (
    "vision_tower",
    "multi_modal_projector",
    "mm_projector",
    "get_vision_tower",
    "get_image_features",
    "get_model",
    "language_model",
    "lm_head",
    "get_output_embeddings",
    "text_config",
    "vision_config",
    "vision_feature_layer",
    "vision_feature_select_strategy",
)
ATTRIBUTE_FOLDERS = ("models", "zoo", "testing")


# ----------------------------------------------------------------------------- the import graph
def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(path: Path, package: Path = PACKAGE) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``: ``import X`` gives ``(X, [])``,
    ``from X import a, b`` gives ``(X, [a, b])``, relative sources made absolute."""
    own = module_name(path, package)
    base_package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    statements = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            statements += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = base_package.split(".")[: len(base_package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            statements.append((source, [alias.name for alias in node.names]))
    return statements


def imports_of(path: Path, package: Path = PACKAGE) -> list[str]:
    """Absolute names of every module ``path`` imports (``from X import y`` gives ``X`` and ``X.y``)."""
    return [
        name
        for source, names in import_statements(path, package)
        for name in [source, *(f"{source}.{n}" for n in names)]
    ]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from X import name`` is ``X.name`` where that
    is a module, else ``X``); self-imports left out."""
    paths = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}

    def resolve(name: str) -> str:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in paths.items():
        targets = set()
        for source, names in import_statements(path, package):
            if source.split(".")[0] != package.name:
                continue
            submodules = [f"{source}.{name}" for name in names if f"{source}.{name}" in paths]
            targets |= set(submodules) if len(submodules) == len(names) and names else {resolve(source), *submodules}
        graph[module] = targets - {module, ""}
    return graph


def folder_of(module: str) -> str:
    """The first name below the package (``pitome_mllm.cli.chat`` -> ``cli``; the root -> ``""``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {folder_of(module): set() for module in graph}
    for module, targets in graph.items():
        folders[folder_of(module)] |= {folder_of(target) for target in targets} - {folder_of(module)}
    return folders


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node, each sorted (Tarjan, iterative)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in graph:
                    continue
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def folder_layers(graph: dict[str, set[str]], layers: dict[str, int]) -> dict[str, int]:
    """Layer of every folder: the table's, else the highest layer of the named folders it imports
    (through other unnamed ones; 0 where it imports none of the package)."""
    folders = folder_graph(graph)
    resolved: dict[str, int] = {}

    def layer(folder: str, seen: frozenset[str] = frozenset()) -> int:
        if folder in layers:
            return layers[folder]
        if folder not in resolved:
            below = [layer(target, seen | {folder}) for target in folders[folder] if target not in seen | {folder}]
            resolved[folder] = max(below, default=0)
        return resolved[folder]

    return {folder: layer(folder) for folder in folders}


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[tuple[str, str]]:
    """``(importer, imported)`` pairs where the imported module sits on a higher layer."""
    layer_of = folder_layers(graph, layers)
    return sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if layer_of[folder_of(target)] > layer_of[folder_of(module)]
    )


def model_attribute_reads(path: Path, attributes: Iterable[str] = MODEL_ATTRIBUTES) -> list[str]:
    """``receiver.attribute`` reads of model attributes in ``path`` (line: expression).

    A read through the adapter's answer (a receiver named ``parts`` or ``..._parts``, a
    `ModelParts`) is what the rule asks for, so it is not reported.
    """
    wanted = set(attributes)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in wanted:
            receiver = ast.unparse(node.value)
            if receiver.split(".")[-1].split("(")[0].endswith("parts"):
                continue
            found.append(f"{node.lineno}: {receiver}.{node.attr}")
    return found


GRAPH = import_graph(PACKAGE)
MODULES = sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> int:
    return folder_layers(GRAPH, LAYERS)[folder_of(module)]


# ----------------------------------------------------------------------------- the package
def test_the_package_has_modules_in_every_layer():
    assert {layer_of(module) for module in GRAPH} == set(LAYERS.values())


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})" for a, b in upward_imports(GRAPH, LAYERS)]
    assert upward == []


def test_no_import_cycle_between_files():
    assert cycles(GRAPH) == []


def test_no_import_cycle_between_folders():
    assert cycles(folder_graph(GRAPH)) == []


def test_shipped_code_does_not_import_testing():
    users = sorted(module for module, targets in GRAPH.items() if any(folder_of(t) == "testing" for t in targets))
    assert [module for module in users if folder_of(module) != "testing"] == []


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(module_name(p)) <= LAYERS["merge"]], ids=module_name)
def test_config_schedule_and_merge_import_no_transformers(path):
    assert not [name for name in imports_of(path) if name.split(".")[0] == "transformers"]


@pytest.mark.parametrize(
    "path", [p for p in MODULES if folder_of(module_name(p)) in ("config", "schedule")], ids=module_name
)
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


def test_model_attribute_paths_appear_only_in_models_zoo_and_testing():
    """Where a model family keeps its parts is the adapters' knowledge (and the builders' that make models)."""
    reads = {
        module_name(path): model_attribute_reads(path)
        for path in MODULES
        if folder_of(module_name(path)) not in ATTRIBUTE_FOLDERS
    }
    assert {module: found for module, found in reads.items() if found} == {}


# ----------------------------------------------------------------------------- the checkers
def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "fakepkg"
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {package, *(path.parent for path in package.rglob("*.py"))}:
        (folder / "__init__.py").touch()
    return package


FAKE_LAYERS = {"low": 0, "high": 1}


def test_checkers_pass_a_clean_package(tmp_path):
    package = write_package(
        tmp_path,
        {
            "low/a.py": "import os\n",
            "high/b.py": "from ..low import a\n",
            "high/c.py": "from fakepkg.high.b import x\n",
        },
    )
    graph = import_graph(package)
    assert graph["fakepkg.high.b"] == {"fakepkg.low.a"}
    assert graph["fakepkg.high.c"] == {"fakepkg.high.b"}
    assert upward_imports(graph, FAKE_LAYERS) == []
    assert cycles(graph) == [] and cycles(folder_graph(graph)) == []


def test_checkers_report_an_upward_import_even_inside_a_function(tmp_path):
    package = write_package(
        tmp_path, {"low/a.py": "def f():\n    from ..high import b\n", "high/b.py": "import json\n"}
    )
    assert upward_imports(import_graph(package), FAKE_LAYERS) == [("fakepkg.low.a", "fakepkg.high.b")]


def test_checkers_report_a_two_file_cycle(tmp_path):
    package = write_package(
        tmp_path,
        {
            "high/b.py": "from . import c\n",
            "high/c.py": "def f():\n    from .b import g\n",
            "high/d.py": "from . import b\n",
        },
    )
    assert cycles(import_graph(package)) == [["fakepkg.high.b", "fakepkg.high.c"]]


def test_checkers_report_a_folder_cycle_through_different_files(tmp_path):
    # No file cycle (a -> d, e -> b), but the folders low and high import each other.
    package = write_package(
        tmp_path,
        {"low/a.py": "from ..high import d\n", "low/b.py": "", "high/d.py": "", "high/e.py": "from ..low import b\n"},
    )
    graph = import_graph(package)
    assert cycles(graph) == []
    assert cycles(folder_graph(graph)) == [["high", "low"]]


def test_an_unnamed_folder_sits_on_the_highest_layer_it_imports(tmp_path):
    package = write_package(
        tmp_path,
        {
            "low/a.py": "from ..fresh import f\n",  # fresh imports nothing: layer 0, so low may use it
            "fresh/f.py": "import math\n",
            "high/b.py": "from ..newer import n\n",
            "newer/n.py": "from ..high import b\n",  # newer imports high: layer 1 (and a cycle)
        },
    )
    graph = import_graph(package)
    assert folder_layers(graph, FAKE_LAYERS) == {"": 0, "low": 0, "high": 1, "fresh": 0, "newer": 1}
    assert upward_imports(graph, FAKE_LAYERS) == []
    assert cycles(folder_graph(graph)) == [["high", "newer"]]


@pytest.mark.parametrize("attribute", MODEL_ATTRIBUTES)
def test_model_attribute_check_reports_every_attribute(tmp_path, attribute):
    path = tmp_path / "tool.py"
    path.write_text(f"def size(model, parts):\n    parts.{attribute}\n    return model.{attribute}\n")
    assert model_attribute_reads(path) == [f"3: model.{attribute}"]

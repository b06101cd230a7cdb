"""CI chooses tests by marker (.ci/run): ``-m model_facing`` in every environment of the transformers / torch
matrix, ``-m vllm`` in the vLLM one. A test module that builds or patches a model must carry ``model_facing``
(or ``vllm``), or say below why it runs in the main environment only, so a new model test cannot silently
drop out of the matrix; a module that needs vLLM must carry ``vllm``. Read from each module's source."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TEST_MODULES = sorted(TESTS.glob("test_*.py"))
# conftest's fixtures that build or save a tiny LLaVA.
MODEL_FIXTURES = {"tiny_llava", "deep_tiny_llava", "demo_llava", "saved_tiny_llava_dir"}
PACKAGE = TESTS.parent / "pitome_mllm"
# Modules that build or patch a model but run in the main environment only (the whole suite), with the reason.
MAIN_ENVIRONMENT_ONLY = {
    "test_real_tower.py": "the real DINOv2 tower of the [proxy] extra re-expressed as CLIP (1.5 min per "
    "environment); patch() on it takes the tiny CLIP models' paths, which the matrix runs",
    "test_proxy_fidelity.py": "the feature-fidelity proxy's reports, resuming and CLI, no version branch",
    "test_proxy_vqa.py": "the easy-VQA proxy benchmark (2.5 min per environment), no version branch",
    "test_sweep.py": "the lmms-eval sweep driver (1.5 min per environment) on a saved tiny model; the plugin "
    "it drives is test_lmms_eval.py's, which the matrix runs",
    "test_sweep_hardening.py": "the sweep driver's locks and failure handling on a saved tiny model",
    "test_web_browser.py": "the web page in headless chromium (the [web] extra and Debian's chromium, which CI "
    "installs for its main environment); the session it drives is test_web.py's, which the matrix runs",
}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def module_marks(tree: ast.Module) -> set[str]:
    """Names ``X`` of every ``pytest.mark.X`` in the module's ``pytestmark``."""
    marks = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "pytestmark" for target in node.targets):
            for inner in ast.walk(node.value):
                if isinstance(inner, ast.Attribute) and getattr(inner.value, "attr", None) == "mark":
                    marks.add(inner.attr)
    return marks


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module imported anywhere in the module (also inside functions), and every ``importorskip`` name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
    return names


def model_uses(tree: ast.Module) -> list[str]:
    """Why a module counts as building or patching a model (empty: it does neither)."""
    uses = set()
    if any(name == "pitome_mllm.zoo" or name.startswith("pitome_mllm.zoo.") for name in imported_modules(tree)):
        uses.add("imports pitome_mllm.zoo")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and MODEL_FIXTURES & {argument.arg for argument in node.args.args}:
            uses.add("uses a tiny-model fixture")
        if isinstance(node, ast.Attribute) and node.attr in ("patch", "patched"):
            if getattr(node.value, "id", None) == "pitome_mllm":
                uses.add(f"calls pitome_mllm.{node.attr}")
    return sorted(uses)


def is_vllm(name: str, vllm_modules: set[str]) -> bool:
    return name.split(".")[0] == "vllm" or name in vllm_modules


def package_modules_importing_vllm() -> set[str]:
    """``pitome_mllm.*`` modules that import vLLM anywhere (at the top or inside a function)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if any(name.split(".")[0] == "vllm" for name in imported_modules(parse(path))):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


VLLM_MODULES = package_modules_importing_vllm()


def needs_vllm(tree: ast.Module) -> bool:
    """Imports vLLM, or a module of this package that does (``from X import y`` counts as importing ``X.y``)."""
    return any(is_vllm(name, VLLM_MODULES) for name in imported_modules(tree))


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda path: path.name)
def test_every_module_that_builds_or_patches_a_model_runs_in_the_matrix(path):
    tree = parse(path)
    uses, marks = model_uses(tree), module_marks(tree)
    if uses and not marks & {"model_facing", "vllm"}:
        assert path.name in MAIN_ENVIRONMENT_ONLY, (
            f"{path.name} {', '.join(uses)}: add `pytestmark = pytest.mark.model_facing` (CI runs it on every "
            f"transformers release it tests), or list it in MAIN_ENVIRONMENT_ONLY of {Path(__file__).name} with why"
        )


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda path: path.name)
def test_every_module_that_needs_vllm_is_marked_vllm(path):
    tree = parse(path)
    if needs_vllm(tree):
        assert "vllm" in module_marks(tree), f"{path.name} imports vLLM code: add `pytestmark = pytest.mark.vllm`"


@pytest.mark.parametrize("name", sorted(MAIN_ENVIRONMENT_ONLY))
def test_each_main_environment_exception_is_a_module_that_uses_a_model_and_is_unmarked(name):
    tree = parse(TESTS / name)
    assert model_uses(tree), f"{name} builds or patches no model: drop it from MAIN_ENVIRONMENT_ONLY"
    assert not module_marks(tree) & {"model_facing", "vllm"}, f"{name} is marked: drop it from MAIN_ENVIRONMENT_ONLY"


def test_the_selection_finds_model_and_vllm_use_and_reads_the_marks():
    unmarked = ast.parse(
        textwrap.dedent(
            """
            import pitome_mllm

            def test_a(tiny_llava):
                with pitome_mllm.patched(*tiny_llava, keep_ratio=0.9):
                    from pitome_mllm.zoo.tiny import TEST_SPEC
            """
        )
    )
    assert model_uses(unmarked) == ["calls pitome_mllm.patched", "imports pitome_mllm.zoo", "uses a tiny-model fixture"]
    assert module_marks(unmarked) == set() and not needs_vllm(unmarked)
    marked = ast.parse(
        textwrap.dedent(
            """
            import pytest
            vllm = pytest.importorskip("vllm")
            from pitome_mllm.cli.serve import vllm_serve_command

            pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore")]
            """
        )
    )
    assert needs_vllm(marked) and module_marks(marked) == {"vllm", "filterwarnings"}
    assert model_uses(marked) == []
    assert not needs_vllm(ast.parse("from pitome_mllm.cli.serve import vllm_serve_command"))
    # The package's own vLLM code counts (the plugin registers itself with vLLM's model registry).
    assert {"pitome_mllm.integrations.vllm", "pitome_mllm.testing.vllm_runs"} <= VLLM_MODULES
    assert needs_vllm(ast.parse("from pitome_mllm.testing import vllm_runs"))


def test_the_markers_ci_selects_are_registered_and_strict():
    pyproject = (TESTS.parent / "pyproject.toml").read_text()
    assert "--strict-markers" in pyproject
    for marker in ("model_facing", "vllm"):
        assert f'"{marker}:' in pyproject
        assert f"-m {marker}" in (TESTS.parent / ".ci" / "run").read_text()

"""Shared fixtures: tiny random transformers LLaVA models, built once per module (or session).

Model fixtures are module-scoped: building is cheap, and the autouse guard below unpatches a
shared model that a failing test left patched. Saved folders are session-scoped because nothing
writes to them after creation. Plain helpers (encode, logits_of, placeholder_counts, ...) live in
`pitome_mllm.testing.llava`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pitome_mllm
from pitome_mllm.assets import load_image
from pitome_mllm.zoo.tiny import DEMO_SPEC, TEST_SPEC, TinyLlavaSpec, build_tiny_llava, save_tiny_llava

# TEST_SPEC's 112 px images (64 patches + CLS) with CLIP-L's 24 layers: deep enough that the
# presets' schedules (every layer, odd layers, BSM first half) give different token counts.
DEEP_TEST_SPEC = TinyLlavaSpec(image_size=112, patch_size=14, vision_layers=24)


@pytest.fixture(scope="module")
def tiny_llava():
    """``(model, processor)`` for `TEST_SPEC` (112 px, 6 CLIP layers, fp32)."""
    return build_tiny_llava(TEST_SPEC)


@pytest.fixture(scope="module")
def deep_tiny_llava():
    """``(model, processor)`` for `DEEP_TEST_SPEC` (112 px, 24 CLIP layers)."""
    return build_tiny_llava(DEEP_TEST_SPEC)


@pytest.fixture(scope="module")
def demo_llava():
    """``(model, processor)`` with CLIP-L/14-336 geometry (577 tokens, 24 layers), tiny widths."""
    return build_tiny_llava(DEMO_SPEC)


@pytest.fixture(scope="session")
def saved_tiny_llava_dir(tmp_path_factory):
    """A folder holding a saved `TEST_SPEC` model and processor (read-only for tests)."""
    return save_tiny_llava(tmp_path_factory.mktemp("saved_tiny_llava"), TEST_SPEC)


@pytest.fixture(scope="session")
def saved_tiny_qwen_dir(tmp_path_factory):
    """``family -> folder`` of a saved tiny Qwen-VL model and processor (``"qwen2.5-vl"``, ``"qwen3-vl"``;
    built on first use, read-only for tests)."""
    from pitome_mllm.zoo.tiny_qwen import save_tiny_qwen_vl

    folders: dict[str, Path] = {}

    def folder(family: str = "qwen2.5-vl") -> Path:
        if family not in folders:
            folders[family] = save_tiny_qwen_vl(tmp_path_factory.mktemp(f"saved_tiny_{family}"), family)
        return folders[family]

    return folder


@pytest.fixture(scope="session")
def images():
    """The bundled photos by name."""
    return {name: load_image(name) for name in ("astronaut", "chelsea", "coffee")}


@pytest.fixture
def fake_launcher() -> list[str]:
    """`fake_lmms_eval.py` in place of ``python -m lmms_eval``, for sweep tests."""
    return [sys.executable, str(Path(__file__).parent / "fake_lmms_eval.py")]


@pytest.fixture(autouse=True)
def _no_patch_outlives_its_test(request):
    """A test that fails while patched must not leave a patch on a model it shares with later tests.

    Looks at the values the test received (``request.node.funcargs``, nothing is built here): a model,
    or a tuple whose first item is one (``(model, processor)``, ``(model, tokenizer, image_processor)``).
    """
    yield
    for value in list(request.node.funcargs.values()):
        model = value[0] if isinstance(value, tuple) and value else value
        if isinstance(model, torch.nn.Module) and (handle := pitome_mllm.get_patch(model)) is not None:
            handle.unpatch()

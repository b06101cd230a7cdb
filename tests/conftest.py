"""Shared fixtures: tiny random transformers LLaVA models, built once per module (or session).

Model fixtures are module-scoped: building is cheap, but a test module that patches a
shared model must unpatch it again (see the autouse guard in ``test_llava_patch.py``).
Saved folders are session-scoped because nothing writes to them after creation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pitome_mllm
from pitome_mllm.assets import load_image
from pitome_mllm.testing.tiny import DEMO_SPEC, TEST_SPEC, TinyLlavaSpec, build_tiny_llava, save_tiny_llava

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
def images():
    """The bundled photos by name."""
    return {name: load_image(name) for name in ("astronaut", "chelsea", "coffee")}


@pytest.fixture
def fake_launcher() -> list[str]:
    """`fake_lmms_eval.py` in place of ``python -m lmms_eval``, for sweep tests."""
    return [sys.executable, str(Path(__file__).parent / "fake_lmms_eval.py")]


def unpatch_fixture_models(request, *names: str) -> None:
    """Unpatch the models of the fixtures ``names`` that a failing test may have left patched."""
    for name in names:
        if name in request.fixturenames:
            handle = pitome_mllm.get_patch(request.getfixturevalue(name)[0])
            if handle is not None:
                handle.unpatch()

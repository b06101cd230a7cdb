"""Shared fixtures: tiny random transformers LLaVA models, built once per module (or session).

Model fixtures are module-scoped: building is cheap, but a test module that patches a
shared model must unpatch it again (see the autouse guard in ``test_llava_patch.py``).
Saved folders are session-scoped because nothing writes to them after creation.
"""

from __future__ import annotations

import contextlib
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


def placeholder_counts(processor, inputs) -> list[int]:
    """Image placeholders in each prompt of ``inputs``."""
    return (inputs["input_ids"] == processor.tokenizer.image_token_id).sum(dim=-1).tolist()


@contextlib.contextmanager
def features_reaching_llm(model):
    """Record every ``image_features`` tensor LLaVA checks against its placeholders (``[tokens, D]``)."""
    llava = model.model
    original = llava.get_placeholder_mask
    seen: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        seen.append(kwargs["image_features"].detach().clone())
        return original(*args, **kwargs)

    llava.get_placeholder_mask = recording
    try:
        yield seen
    finally:
        del llava.get_placeholder_mask


def prefill_features(model, inputs) -> torch.Tensor:
    """The image features of one forward, ``[num_images * tokens, D]``."""
    with features_reaching_llm(model) as seen, torch.no_grad():
        model(**inputs)
    assert len(seen) == 1
    return seen[0]


def pitome_leftovers(model) -> list[str]:
    """Modules still carrying an instance forward / generate, a hook or an attribute from this library."""

    def ours(function) -> bool:
        return (getattr(function, "__module__", None) or "").startswith("pitome_mllm")

    left = []
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        # An override made with functools.wraps carries the library's __module__: look for generate itself.
        if ours(module.__dict__.get("forward")) or "generate" in module.__dict__ or any(map(ours, hooks)):
            left.append(name)
        if any(attribute.startswith("_pitome") for attribute in module.__dict__):
            left.append(name)
    return left


@contextlib.contextmanager
def one_torch_thread():
    """Tiny tensors: one thread is faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

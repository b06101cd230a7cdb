"""The tested transformers releases and the one warning `patch()` gives outside them (once per process)."""

from __future__ import annotations

import warnings

import pytest
import transformers

import pitome_mllm
from pitome_mllm.models import compat

pytestmark = pytest.mark.model_facing

UNTESTED = "not among the releases pitome-mllm is tested with"


@pytest.fixture
def no_warning_given_yet(monkeypatch):
    """This process has not warned yet (an earlier patch() on an untested release may have)."""
    monkeypatch.setattr(compat, "_untested_warning_given", False)


def untested_warnings(caught) -> list[str]:
    return [str(warning.message) for warning in caught if UNTESTED in str(warning.message)]


@pytest.mark.parametrize(
    ("version", "tested"),
    [
        ((4, 56), False),
        ((4, 57), True),
        ((4, 58), False),
        ((5, 0), False),
        ((5, 15), False),
        ((5, 16), True),
        ((5, 24), True),
        ((5, 25), True),
        ((5, 26), False),
        ((6, 0), False),
        ((3, 57), False),
    ],
)
def test_the_tested_releases_are_4_57_and_5_16_to_5_25(version, tested):
    assert compat.is_tested_transformers(version) is tested


def test_the_tested_set_reads_as_the_readme_states_it():
    assert compat.TESTED_TRANSFORMERS == "4.57.x, 5.16 → 5.25"


@pytest.mark.parametrize("version", ["5.26.0", "5.15.1", "6.0.0.dev0"])
def test_an_untested_version_warns_once_naming_it_and_the_tested_range(monkeypatch, no_warning_given_yet, version):
    monkeypatch.setattr(transformers, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_untested_transformers()
        compat.warn_if_untested_transformers()
    [message] = untested_warnings(caught)
    assert f"transformers {version} " in message and "(4.57.x, 5.16 → 5.25)" in message
    assert caught[0].category is UserWarning


@pytest.mark.parametrize("version", ["4.57.6", "5.16.1", "5.24.0", "5.25.0"])
def test_a_tested_version_does_not_warn(monkeypatch, no_warning_given_yet, version):
    monkeypatch.setattr(transformers, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_untested_transformers()
    assert untested_warnings(caught) == []


def test_patch_warns_once_per_process_on_an_untested_release(monkeypatch, no_warning_given_yet, tiny_llava):
    # The installed release stays what the adapters see; only the tested set leaves it out.
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS_MINORS", {})
    model, processor = tiny_llava
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pitome_mllm.patch(model, processor, keep_ratio=0.9).unpatch()
    [warning] = [warning for warning in caught if UNTESTED in str(warning.message)]
    assert f"transformers {transformers.__version__} " in str(warning.message)
    assert warning.filename == __file__  # it points at the call of patch()


def test_patch_on_a_tested_release_does_not_warn(monkeypatch, no_warning_given_yet, tiny_llava):
    installed = compat.transformers_version()
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS_MINORS", {installed[0]: (installed[1], installed[1])})
    model, processor = tiny_llava
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pitome_mllm.patched(model, processor, keep_ratio=0.9):
            pass
    assert untested_warnings(caught) == []

"""The reduction settings both proxies run: setting name -> `PiToMeConfig` fields.

Each proxy lists, in its own display order, which of these it runs (`pick`) next to the
settings only it has (the fidelity probe has no prompt, easy-VQA has a language model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SHARED_SETTINGS: dict[str, dict[str, Any]] = {
    "tome": {"method": "tome", "preset": "reference"},
    "tome_sw": {"method": "tome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_reference": {"method": "pitome", "preset": "reference"},
    "pitome_paper": {"method": "pitome", "preset": "paper"},
    "pitome_reference_sw": {"method": "pitome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_keys": {"method": "pitome", "preset": "reference", "metric": "keys"},
    "pitome_keys_sw": {"method": "pitome", "preset": "reference", "metric": "keys", "reduce": "size_weighted"},
    "pitome_pure": {"method": "pitome", "preset": "pure"},
    # Only the projector-stage PiToMe steps (on the projected tokens); the tower runs unmerged.
    "pitome_projector_only": {"method": "none"},
    "random": {"method": "random"},
    "pool": {"method": "pool"},
    "dominant": {"method": "dominant"},
    # The small-budget methods (docs/methods.md); "visionzip" is "dominant" under its published name.
    "fastervlm": {"method": "fastervlm"},
    "divprune": {"method": "divprune"},
    # Ranks patches against the prompt: only a proxy with a prompt can run it.
    "cdpruner": {"method": "cdpruner"},
    # PiToMe's select-then-merge preset: keep isolated (low-energy) and class-attended tokens, merge the rest.
    "pitome_mllm": {"method": "pitome", "preset": "mllm"},
}
REFERENCE_SETTING = "pitome_reference"  # what the paired differences are taken against


def pick(*names: str) -> dict[str, dict[str, Any]]:
    """``{name: fields}`` of the shared settings ``names``, in that order."""
    return {name: SHARED_SETTINGS[name] for name in names}


def setting_methods(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Setting -> its `PiToMeConfig` method (what the summary plots style a line by)."""
    return {name: fields["method"] for name, fields in settings.items()}

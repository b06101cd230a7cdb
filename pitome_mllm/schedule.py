"""Per-layer merge schedules and the token counts they produce, known before any model runs.

Pure arithmetic: no tensors, no models. For a config and an input token count this
module says which method each vision layer uses, how many tokens it removes, with
which margin, and so how many visual tokens reach the language model.

Presets (docs/algorithm.md §2 and §5):

* ``reference`` - the authors' released LLaVA code: a merge after every layer;
  ToMe's bipartite soft matching on the first half of the layers (``l <= L // 2``,
  ``r = floor(T - T*ratio)`` with ``T`` counting the class token), PiToMe with the
  ELU energy after that (``T`` without the class token).
* ``paper`` - the schedule behind the paper's LLaVA table (spring 2024 code): merges
  only on odd layer indices, ToMe on the first half, the Gaussian-kernel energy after.
* ``pure`` - the paper's algorithm (Eq. 4 energy) on every layer, no ToMe layers.

The removal count replicates the released code's float arithmetic exactly
(``math.floor(T - T * ratio)`` in float64), so token counts can be compared with
the authors' runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ENERGY_KINDS, METHODS, PRESET_ENERGY, PRESETS, check_keep_ratio  # noqa: F401  (re-exported)
from .methods import method_of_preset


def margin_for_layer(layer_idx: int, num_layers: int, start: float = 0.9, span: float = 0.9) -> float:
    """The adaptive margin ``m_l = start - span * l / L`` (0-based ``l``).

    It *decreases* with depth, as in the authors' code (the paper's text calls it
    "increasing" but its formula decreases; docs/algorithm.md §6).
    """
    return start - span * layer_idx / num_layers


def projector_margin(num_layers: int, start: float = 0.9, span: float = 0.9) -> float:
    """The margin of a merge after the tower: the layer schedule continued one layer past the last."""
    return margin_for_layer(num_layers, num_layers, start, span)


@dataclass(frozen=True)
class PresetSchedule:
    """How a preset spreads merges over the layers."""

    odd_layers_only: bool  # merge only after layers 1, 3, 5, ...
    tome_first_half: bool  # layers l <= L // 2 use bipartite soft matching
    energy: str  # energy kind of the PiToMe layers
    merges_in_tower: bool = True  # False: the preset selects at the projector, the tower never merges


PRESET_SCHEDULES = {
    "reference": PresetSchedule(odd_layers_only=False, tome_first_half=True, energy=PRESET_ENERGY["reference"]),
    "paper": PresetSchedule(odd_layers_only=True, tome_first_half=True, energy=PRESET_ENERGY["paper"]),
    "pure": PresetSchedule(odd_layers_only=False, tome_first_half=False, energy=PRESET_ENERGY["pure"]),
    # The preset a method brings (method "mllm": select and merge once at the projector, docs/methods.md)
    # plans no merge in the tower.
    **{
        preset: PresetSchedule(
            odd_layers_only=False, tome_first_half=False, energy=PRESET_ENERGY[preset], merges_in_tower=False
        )
        for preset in PRESETS
        if method_of_preset(preset) is not None
    },
}


@dataclass(frozen=True)
class LayerStep:
    """What happens after one vision layer.

    Attributes:
        layer_idx: 0-based encoder layer index.
        method: ``"pitome"``, ``"tome"`` (bipartite soft matching) or ``"none"``.
        r: tokens removed after this layer.
        margin: PiToMe energy margin of this layer.
        energy: energy kind of a PiToMe step.
        tokens_in: tokens entering the merge (class token included).
        tokens_out: tokens leaving it (class token included).
    """

    layer_idx: int
    method: str
    r: int
    margin: float
    energy: str
    tokens_in: int
    tokens_out: int


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def removal_count(num_tokens: int, keep_ratio: float) -> int:
    """``floor(T - T * keep_ratio)`` in float64, as the released code computes it."""
    if keep_ratio >= 1.0:
        return 0
    return math.floor(num_tokens - num_tokens * keep_ratio)


def plan_layers(
    num_tokens: int,
    num_layers: int,
    keep_ratio: float,
    *,
    method: str = "pitome",
    preset: str = "reference",
    class_token: bool = True,
    last_layer: int | None = None,
    margin_start: float = 0.9,
    margin_span: float = 0.9,
    energy: str | None = None,
) -> list[LayerStep]:
    """The merge step after every layer ``0..last_layer``.

    Args:
        num_tokens: tokens entering layer 0 (class token included).
        num_layers: ``L``, the encoder's depth (sets the margins and the BSM half).
        keep_ratio: fraction of tokens kept by each merging layer, in (0.5, 1.0].
        method: ``"pitome"`` (the preset's mix of BSM and PiToMe layers), ``"tome"``
            (BSM on every merging layer) or ``"none"``.
        preset: ``"reference"``, ``"paper"``, ``"pure"`` (module docstring) or a method's own
            preset (``"mllm"``: no merge in the tower).
        class_token: the first token is a class token (never merged).
        last_layer: the last layer whose output is used (default ``L - 1``); later
            layers are not planned.
        margin_start, margin_span: margin ``m_l = start - span * l / L``.
        energy: override the preset's energy kind.

    Returns:
        One `LayerStep` per layer ``0..last_layer``.
    """
    check_keep_ratio(keep_ratio)
    _check_choice("method", method, METHODS)
    _check_choice("preset", preset, PRESETS)
    if last_layer is None:
        last_layer = num_layers - 1
    if not (0 <= last_layer < num_layers):
        raise ValueError(f"last_layer must be in [0, {num_layers - 1}], got {last_layer}")
    schedule = PRESET_SCHEDULES[preset]
    energy = energy or schedule.energy
    cls = 1 if class_token else 0

    steps = []
    tokens = num_tokens
    for layer_idx in range(last_layer + 1):
        margin = margin_for_layer(layer_idx, num_layers, margin_start, margin_span)
        merges_here = (
            method != "none" and schedule.merges_in_tower and (not schedule.odd_layers_only or layer_idx % 2 == 1)
        )
        if not merges_here or keep_ratio >= 1.0:
            kind, r = "none", 0
        elif method == "tome" or (schedule.tome_first_half and layer_idx <= num_layers // 2):
            kind, r = "tome", removal_count(tokens, keep_ratio)
        else:
            kind, r = "pitome", removal_count(tokens - cls, keep_ratio)
        if r == 0:
            kind = "none"
        steps.append(LayerStep(layer_idx, kind, r, margin, energy, tokens, tokens - r))
        tokens -= r
    return steps


def token_counts(
    num_tokens: int,
    num_layers: int,
    keep_ratio: float,
    preset: str = "reference",
    class_token: bool = True,
    method: str = "pitome",
) -> list[int]:
    """Tokens after each layer (class token included), for every layer ``0..L-1``.

    >>> token_counts(577, 24, 0.9)[22] - 1   # CLIP ViT-L/14-336, LLaVA reads layer 22
    54
    """
    steps = plan_layers(num_tokens, num_layers, keep_ratio, method=method, preset=preset, class_token=class_token)
    return [step.tokens_out for step in steps]


def vision_output_tokens(
    num_tokens: int,
    num_layers: int,
    keep_ratio: float,
    last_layer: int,
    *,
    method: str = "pitome",
    preset: str = "reference",
    class_token: bool = True,
) -> int:
    """Tokens (class token included) in the output of ``last_layer``."""
    steps = plan_layers(
        num_tokens,
        num_layers,
        keep_ratio,
        method=method,
        preset=preset,
        class_token=class_token,
        last_layer=last_layer,
    )
    return steps[-1].tokens_out


def solve_keep_ratio(
    num_tokens: int,
    num_layers: int,
    min_tokens: int,
    last_layer: int,
    *,
    method: str = "pitome",
    preset: str = "reference",
    class_token: bool = True,
    tolerance: float = 1e-7,
) -> float:
    """The smallest keep ratio whose vision output still has at least ``min_tokens`` tokens.

    The count is non-decreasing in the keep ratio, so bisection finds it. Used for
    ``target_tokens``: the vision tower merges as far as it can without going below
    the budget, and a final projector-stage step removes the few tokens left over.

    Args:
        min_tokens: required tokens in the vision output (class token included).

    Raises:
        ValueError: ``min_tokens`` exceeds the unmerged count.
    """
    if min_tokens > num_tokens:
        raise ValueError(f"cannot keep {min_tokens} tokens out of {num_tokens}")

    def count(ratio: float) -> int:
        return vision_output_tokens(
            num_tokens, num_layers, ratio, last_layer, method=method, preset=preset, class_token=class_token
        )

    low, high = 0.5, 1.0  # count(high) == num_tokens >= min_tokens; low is excluded
    while high - low > tolerance:
        mid = (low + high) / 2
        if count(mid) >= min_tokens:
            high = mid
        else:
            low = mid
    return high

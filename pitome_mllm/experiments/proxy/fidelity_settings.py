"""The fidelity proxy's settings and how each meets a visual-token budget on the tower.

A setting is a named set of `PiToMeConfig` fields (`SETTINGS`); `setting_config` turns one
setting and one budget into the fields `pitome_mllm.patch` gets. The token counts come from the
model's adapter (`tower_geometry`) and `pitome_mllm.schedule`, the same source the patched
model merges with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .settings import pick

if TYPE_CHECKING:
    from ...geometry import TowerGeometry

WEIGHTED_POOL_LABEL = "size-weighted pool (≈ LLM prop-attn)"
# Methods whose result depends on `seed` (PiToMeConfig.seed); the others are deterministic.
SEEDED_METHODS = ("random",)

# How a setting meets a budget (the value of BUDGET_KEY in its SETTINGS entry):
# "target_tokens" (default): PiToMeConfig.target_tokens = budget (exact count);
# "tower_keep_ratio": no projector-stage step, keep_ratio solved so the tower alone lands
#   as close to the budget as its schedule allows (`tower_only_keep_ratio`);
# None: the setting ignores budgets and gives one row (the unmerged reference).
BUDGET_KEY = "budget"
BUDGET_MODES = ("target_tokens", "tower_keep_ratio", None)

# Setting -> PiToMeConfig fields (plus BUDGET_KEY). One line adds a setting.
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"method": "none", BUDGET_KEY: None},
    **pick(
        "tome",
        "tome_sw",
        "pitome_reference",
        "pitome_paper",
        "pitome_reference_sw",
        "pitome_keys",
        "pitome_keys_sw",
        "pitome_pure",
    ),
    # Measures the projector-stage step: the same merges, but only as far as the tower gets. On the
    # 224 px DINOv2 tower (11 merging layers) the solved keep ratio lands exactly on every budget in
    # 2..255, so there the step removes nothing and this row equals pitome_reference.
    "pitome_tower_only": {"method": "pitome", "preset": "reference", BUDGET_KEY: "tower_keep_ratio"},
    # cdpruner is not here: it ranks patches against the prompt, and the probe has none.
    **pick("pitome_projector_only", "random", "pool", "dominant", "fastervlm", "divprune", "pitome_mllm"),
}
# pitome_tower_only is left out by default: on this tower it repeats pitome_reference exactly.
DEFAULT_SETTINGS = tuple(name for name in SETTINGS if name != "pitome_tower_only")


def tower_geometry(model) -> TowerGeometry:
    """The token geometry of ``model``'s vision tower, as the model's adapter reports it."""
    from ...models import model_geometry

    return model_geometry(model)


def tower_visual_tokens(geometry: TowerGeometry, keep_ratio: float, preset: str, method: str = "pitome") -> int:
    """Visual tokens (class token dropped where the model drops it) the tower alone leaves at ``keep_ratio``."""
    from ...schedule import token_counts

    counts = token_counts(geometry.default_num_tokens, geometry.num_layers, keep_ratio, preset=preset, method=method)
    return counts[geometry.last_layer] - int(geometry.drops_class_token)


def tower_only_keep_ratio(
    budget: int, geometry: TowerGeometry, preset: str = "reference", method: str = "pitome"
) -> tuple[float, int]:
    """The keep ratio whose tower output is closest to ``budget`` visual tokens, and that count.

    `solve_keep_ratio` gives the smallest ratio still at or above the budget; a ratio just
    below it gives the largest count under the budget. The closer one wins (ties: the one
    above, which never gives the language model less than asked).
    """
    from ...schedule import solve_keep_ratio

    tolerance = 1e-7
    above = solve_keep_ratio(
        geometry.default_num_tokens,
        geometry.num_layers,
        budget + int(geometry.drops_class_token),  # the tower still holds the class token the model drops
        geometry.last_layer,
        method=method,
        preset=preset,
        tolerance=tolerance,
    )
    candidates = [(above, tower_visual_tokens(geometry, above, preset, method))]
    below = above - 2 * tolerance  # past the bisection's last bracket, so strictly under the step
    if below > 0.5:
        candidates.append((below, tower_visual_tokens(geometry, below, preset, method)))
    return min(candidates, key=lambda pair: (abs(pair[1] - budget), -pair[1]))


def setting_budgets(name: str, budgets: Sequence[int]) -> list[int | None]:
    """The budgets a setting runs at: ``[None]`` for an unbudgeted setting."""
    mode = SETTINGS[name].get(BUDGET_KEY, "target_tokens")
    return [None] if mode is None else list(budgets)


def setting_config(name: str, budget: int | None, geometry: TowerGeometry) -> dict[str, Any]:
    """PiToMeConfig fields of one setting at one budget (validated).

    Raises:
        ValueError: unknown setting, or a budget the setting cannot make (e.g. ``pool`` with a
            prime budget); the message names what is allowed.
    """
    from ...config import PiToMeConfig

    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; allowed: {', '.join(SETTINGS)}")
    fields = dict(SETTINGS[name])
    mode = fields.pop(BUDGET_KEY, "target_tokens")
    if mode not in BUDGET_MODES:
        raise ValueError(f"setting {name!r}: {BUDGET_KEY} must be one of {BUDGET_MODES}, got {mode!r}")
    if mode == "target_tokens":
        fields["target_tokens"] = budget
    elif mode == "tower_keep_ratio":
        preset = fields.get("preset", "reference")
        fields["keep_ratio"], _ = tower_only_keep_ratio(budget, geometry, preset, fields.get("method", "pitome"))
    PiToMeConfig(**fields)  # validates every field
    if fields["method"] == "pool":
        from ...merge.select import pool_grid, square_grid

        # ValueError naming the budgets that fit
        pool_grid(budget, square_grid(geometry.native_visual_tokens))
    return fields


def parse_settings(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
    return names


def is_seeded(name: str) -> bool:
    """Whether setting ``name`` changes with the seed (its method is in `SEEDED_METHODS`)."""
    return SETTINGS[name]["method"] in SEEDED_METHODS

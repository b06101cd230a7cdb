"""`PiToMeConfig`: every knob of a patch, validated, with presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------ vocabulary
# Every name a setting can take, in one place (the schedule, the merge functions, the
# adapters and the command line take them from here).
PRESETS = ("reference", "paper", "pure", "mllm")
# Algorithms of a merge step: PiToMe, and ToMe's bipartite soft matching.
MERGE_METHODS = ("pitome", "tome")
# Methods that plan the vision tower (a schedule of merge steps, or none at all).
METHODS = (*MERGE_METHODS, "none")
ENERGY_KINDS = ("elu", "paper", "gaussian")
# The energy of each preset's PiToMe steps (docs/algorithm.md §3, §5), used when energy is None.
PRESET_ENERGY = {"reference": "elu", "paper": "gaussian", "pure": "paper", "mllm": "elu"}
METRICS = ("hidden", "keys", "keys_mean")
# Methods that leave the tower unmerged and choose or pool the patch tokens to exactly
# target_tokens at the projector (pitome_mllm.merge.select; docs/methods.md). "visionzip" is the
# published name of "dominant" (one implementation, two names).
SELECTION_METHODS = ("random", "pool", "dominant", "visionzip", "fastervlm", "divprune", "cdpruner")
# Selection methods that rank patches by the class token's attention in the layer the model reads.
CLS_ATTENTION_METHODS = ("dominant", "visionzip", "fastervlm")
# Selection methods that need the prompt of each image (instruction-conditioned).
INSTRUCTION_METHODS = ("cdpruner",)
# The preset of `method="pitome"` for small budgets: select by energy and class-token attention
# at the layer the model reads, then merge the rest into the kept tokens (docs/methods.md).
SELECT_MERGE_PRESETS = ("mllm",)
# Model dtypes the loaders and the command line accept ("auto": the checkpoint's own).
DTYPES = ("auto", "float16", "bfloat16", "float32")
ALL_METHODS = METHODS + SELECTION_METHODS
REDUCES = ("mean", "size_weighted")

# What each preset sets beyond the schedule (docs/algorithm.md §1, §5, §6).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The authors' released LLaVA code: layer output as metric, plain mean, no size tracking.
    "reference": {"metric": "hidden", "reduce": "mean", "prop_attn": False},
    # Same model-side behaviour, the spring-2024 schedule (odd layers, Gaussian energy).
    "paper": {"metric": "hidden", "reduce": "mean", "prop_attn": False},
    # The paper's algorithm: keys as metric, size-weighted merge, proportional attention.
    "pure": {"metric": "keys", "reduce": "size_weighted", "prop_attn": True},
    # Select-then-merge for <= 128 tokens: keys of the read layer (averaged over heads) as metric,
    # size-weighted merge of every dropped patch into its most similar kept token, half of the
    # kept tokens by lowest energy and half by class-token attention.
    "mllm": {"metric": "keys_mean", "reduce": "size_weighted", "prop_attn": False, "energy_share": 0.5},
}


def check_keep_ratio(keep_ratio: float) -> float:
    """``keep_ratio`` as a float, or a ValueError naming the allowed range."""
    # numbers.Real admits numpy scalars (np.float32 is not a float subclass, np.float64 is).
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise ValueError(f"keep_ratio must be a number in (0.5, 1.0], got {keep_ratio!r}")
    if not (0.5 < keep_ratio <= 1.0):
        raise ValueError(
            f"keep_ratio must be in (0.5, 1.0], got {keep_ratio} (a step can remove at most half of the tokens)"
        )
    return float(keep_ratio)


@dataclass
class PiToMeConfig:
    """Configuration of a patch.

    Attributes:
        method: ``"pitome"``, ``"tome"`` (bipartite soft matching on every merging layer)
            or ``"none"`` (no merging in the tower; with ``target_tokens`` only the
            projector-stage step runs; ``target_tokens=0`` gives the LLM no visual tokens).
            Baselines with an unmerged tower and an exact ``target_tokens``: ``"random"``
            (a seeded random subset of the patches), ``"pool"`` (average pooling of the
            patch grid), ``"dominant"`` / ``"visionzip"`` (VisionZip: patches the class token
            attends to most, plus a few contextual means of the rest), ``"fastervlm"`` (the
            patches the class token attends to most), ``"divprune"`` (max-min diversity) and
            ``"cdpruner"`` (a DPP conditioned on the prompt); see docs/methods.md.
        keep_ratio: fraction of tokens each merging layer keeps, in (0.5, 1.0]. With
            ``target_tokens`` set and ``keep_ratio`` left as None, it is solved so that
            the tower lands just above the budget.
        preset: ``"reference"`` (authors' released LLaVA code), ``"paper"`` (the schedule
            behind the paper's LLaVA table), ``"pure"`` (the paper's algorithm) or ``"mllm"``
            (``method="pitome"`` with ``target_tokens``, for small budgets: keep the patches of
            lowest energy and those the class token attends to most at the layer the model
            reads, merge every other patch into its most similar kept one; tower unmerged).
        target_tokens: exact number of visual tokens per image reaching the language
            model; a final PiToMe step on the projected tokens lands on it. 0 only
            with ``method="none"``.
        metric: features that decide the merges: ``"hidden"`` (layer output),
            ``"keys"`` (the layer's attention keys, all heads concatenated) or
            ``"keys_mean"`` (keys averaged over heads, as ToMe; cheaper).
        reduce: ``"mean"`` (plain mean of a group, as the released code) or
            ``"size_weighted"`` (mean weighted by how many patches each token holds).
        prop_attn: add ``log(size)`` to the attention logits in the vision tower
            (proportional attention, paper section 3.2).
        keep_order: hand the merged tokens to the language model in raster order
            (by each group's first patch) instead of the merge order.
        llm_prop_attn: proportional attention inside the language model: add ``log(size)``
            (patches a visual token holds) to the attention logits of every visual key in
            every LLM self-attention layer, through the additive mask (SDPA stays on).
            A no-op when every token holds one patch. transformers LLaVA-1.5 only
            (``llava_hf``); see docs/methods.md.
        margin_start, margin_span: energy margin of layer ``l``:
            ``margin_start - margin_span * l / L``.
        alpha: ELU alpha of the energy.
        energy: energy kind; None takes the preset's.
        seed: seed of ``method="random"`` (every image draws its subset from a fresh
            generator seeded with it, so all images keep the same positions).
        energy_share: preset ``"mllm"`` only: the fraction of ``target_tokens`` kept because
            their energy is lowest (isolated patches), in [0, 1]; the rest of the budget goes
            to the patches the class token attends to most. None takes the preset's (0.5).
    """

    method: str = "pitome"
    keep_ratio: float | None = None
    preset: str = "reference"
    target_tokens: int | None = None
    metric: str | None = None
    reduce: str | None = None
    prop_attn: bool | None = None
    keep_order: bool = False
    llm_prop_attn: bool = False
    margin_start: float = 0.9
    margin_span: float = 0.9
    alpha: float = 1.0
    energy: str | None = None
    seed: int = 0
    energy_share: float | None = None

    def __post_init__(self) -> None:
        self._validate()
        defaults = PRESET_DEFAULTS[self.preset]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    # ------------------------------------------------------------ validation
    def _validate(self) -> None:
        def choice(name: str, allowed: tuple[str, ...], optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

        choice("method", ALL_METHODS)
        choice("preset", PRESETS)
        choice("metric", METRICS, optional=True)
        choice("reduce", REDUCES, optional=True)
        choice("energy", ENERGY_KINDS, optional=True)
        if self.keep_ratio is not None:
            self.keep_ratio = check_keep_ratio(self.keep_ratio)
        if self.target_tokens is not None:
            if isinstance(self.target_tokens, bool) or not isinstance(self.target_tokens, numbers.Integral):
                raise ValueError(f"target_tokens must be a positive integer, got {self.target_tokens!r}")
            self.target_tokens = int(self.target_tokens)  # numpy integers too; JSON needs a plain int
            if self.target_tokens < 0:
                raise ValueError(f"target_tokens must be >= 1, got {self.target_tokens}")
            if self.target_tokens == 0 and self.method != "none":
                raise ValueError(
                    "target_tokens must be >= 1, got 0 (target_tokens=0, no visual tokens at all, is valid only "
                    f"with method='none'; got method={self.method!r})"
                )
        if self.method == "none" and self.keep_ratio is not None and self.keep_ratio != 1.0:
            raise ValueError(
                f"method='none' does not merge in the vision tower, so keep_ratio={self.keep_ratio} would be ignored; "
                "drop keep_ratio (target_tokens alone sets the budget) or choose method 'pitome' or 'tome'"
            )
        if self.method in SELECTION_METHODS:
            if self.target_tokens is None:
                raise ValueError(f"method={self.method!r} needs target_tokens (the exact budget per image)")
            if self.keep_ratio is not None and self.keep_ratio != 1.0:
                raise ValueError(
                    f"method={self.method!r} leaves the vision tower unmerged: keep_ratio must be None or 1.0, "
                    f"got {self.keep_ratio}"
                )
        self._validate_select_merge()
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.seed = int(self.seed)
        if self.keep_ratio is None and self.target_tokens is None and self.method != "none":
            raise ValueError(f"method={self.method!r} needs keep_ratio (in (0.5, 1.0]) or target_tokens")
        for name in ("prop_attn", "keep_order"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        # Not preset-derived, so None (unset) is not allowed either.
        if not isinstance(self.llm_prop_attn, bool):
            raise ValueError(f"llm_prop_attn must be True or False, got {self.llm_prop_attn!r}")
        for name in ("margin_start", "margin_span", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value) if not isinstance(value, int) else value)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    def _validate_select_merge(self) -> None:
        """The ``mllm`` preset's constraints, and ``energy_share`` only where it means something."""
        if self.energy_share is not None:
            value = self.energy_share
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"energy_share must be a number in [0, 1], got {value!r}")
            if self.preset not in SELECT_MERGE_PRESETS:
                raise ValueError(
                    f"energy_share is a setting of preset {SELECT_MERGE_PRESETS}, got preset={self.preset!r}; "
                    "drop energy_share or choose preset='mllm'"
                )
            self.energy_share = float(value)
        if self.preset not in SELECT_MERGE_PRESETS:
            return
        if self.method != "pitome":
            raise ValueError(
                f"preset={self.preset!r} is a PiToMe setting: method must be 'pitome', got method={self.method!r}"
            )
        if self.target_tokens is None or self.target_tokens < 1:
            raise ValueError(
                f"preset={self.preset!r} needs target_tokens (the exact budget per image, >= 1), "
                f"got {self.target_tokens!r}"
            )
        if self.keep_ratio is not None and self.keep_ratio != 1.0:
            raise ValueError(
                f"preset={self.preset!r} selects and merges at the layer the model reads, on the unmerged tower: "
                f"keep_ratio must be None or 1.0, got {self.keep_ratio}"
            )
        if self.prop_attn:
            raise ValueError(
                f"preset={self.preset!r} leaves the tower unmerged, so prop_attn=True would do nothing; drop it"
            )

    # ------------------------------------------------------------- derived
    @property
    def effective_keep_ratio(self) -> float:
        """The keep ratio the tower uses when it is fixed by the user (1.0 if unset)."""
        return 1.0 if self.keep_ratio is None else self.keep_ratio

    @property
    def resolved_energy(self) -> str:
        """The energy kind of the PiToMe steps: ``energy``, or the preset's when unset."""
        return self.energy or PRESET_ENERGY[self.preset]

    @property
    def selects_at_projector(self) -> bool:
        """The tower stays unmerged and a selection stage lands on ``target_tokens`` at the projector."""
        return self.method in SELECTION_METHODS or self.preset in SELECT_MERGE_PRESETS

    @property
    def merges_in_tower(self) -> bool:
        if self.method == "none" or self.selects_at_projector:
            return False
        return self.keep_ratio is None or self.keep_ratio < 1.0

    # ---------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PiToMeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PiToMeConfig:
        path = Path(text_or_path)
        text = (
            path.read_text() if not str(text_or_path).lstrip().startswith("{") and path.exists() else str(text_or_path)
        )
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> PiToMeConfig:
        """A new validated config with some fields changed."""
        values = self.to_dict()
        # Preset-derived fields follow a new preset unless given explicitly.
        if "preset" in overrides and overrides["preset"] != self.preset:
            for name in PRESET_DEFAULTS[self.preset]:
                if values[name] == PRESET_DEFAULTS[self.preset][name]:
                    values[name] = None
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(values)}")
        values.update(overrides)
        return PiToMeConfig(**values)

"""`PiToMeConfig`: every knob of a patch, validated, with presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .methods import (
    MERGE,
    METHOD_NAMES,
    SELECTION,
    TOWER,
    fields_read,
    method_label,
    method_of_preset,
    method_spec,
    methods_reading,
    methods_where,
)

# ------------------------------------------------------------------------------ vocabulary
# Every name a setting can take, in one place (the schedule, the merge functions, the
# adapters and the command line take them from here). The method tuples are questions asked
# of the method registry (`pitome_mllm.methods`), which declares what each method can do.
PRESETS = ("reference", "paper", "pure", "mllm")
# The preset of a config that names none.
DEFAULT_PRESET = "reference"
# Algorithms of a merge step: PiToMe, and ToMe's bipartite soft matching.
MERGE_METHODS = methods_where(kind=MERGE)
# Methods that plan the vision tower (a schedule of merge steps, or none at all).
METHODS = methods_where(stage=TOWER)
ENERGY_KINDS = ("elu", "paper", "gaussian")
# The energy of each preset's PiToMe steps (docs/algorithm.md §3, §5), used when energy is None.
PRESET_ENERGY = {"reference": "elu", "paper": "gaussian", "pure": "paper", "mllm": "elu"}
METRICS = ("hidden", "keys", "keys_mean")
# The baselines that leave the tower unmerged and choose or pool the patch tokens to exactly
# target_tokens at the projector (pitome_mllm.merge.select; docs/methods.md). "visionzip" is the
# published name of "dominant" (one implementation, two names).
SELECTION_METHODS = methods_where(kind=SELECTION)
# Methods that rank patches by the class token's attention in the layer the model reads.
CLS_ATTENTION_METHODS = methods_where(needs_class_attention=True)
# Methods that need the prompt of each image (instruction-conditioned).
INSTRUCTION_METHODS = methods_where(needs_prompt=True)
# A method's own preset is also spelt as that preset of PiToMe: ``method="pitome", preset="mllm"``
# is ``method="mllm"`` (docs/methods.md).
PRESET_ALIAS_METHOD = "pitome"
# Model dtypes the loaders and the command line accept ("auto": the checkpoint's own).
DTYPES = ("auto", "float16", "bfloat16", "float32")
ALL_METHODS = METHOD_NAMES
REDUCES = ("mean", "size_weighted")

# What each preset sets beyond the schedule (docs/algorithm.md §1, §5, §6).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The authors' released LLaVA code: layer output as metric, plain mean, no size tracking.
    "reference": {"metric": "hidden", "reduce": "mean", "prop_attn": False},
    # Same model-side behaviour, the spring-2024 schedule (odd layers, Gaussian energy).
    "paper": {"metric": "hidden", "reduce": "mean", "prop_attn": False},
    # The paper's algorithm: keys as metric, size-weighted merge, proportional attention.
    "pure": {"metric": "keys", "reduce": "size_weighted", "prop_attn": True},
    # The defaults of method "mllm" (select-then-merge for <= 128 tokens): keys of the read layer
    # (averaged over heads) as metric, size-weighted merge of every dropped patch into its most
    # similar kept token, half of the kept tokens by lowest energy and half by class-token attention.
    "mllm": {"metric": "keys_mean", "reduce": "size_weighted", "prop_attn": False, "energy_share": 0.5},
}


# Finite ranges of the numeric settings. Margins are compared with cosine similarities in [-1, 1], so
# a margin schedule outside [-2, 2] changes nothing but can overflow; alpha scales an ELU; the seed
# seeds a torch.Generator (a signed 64-bit integer).
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "margin_start": (-2.0, 2.0),
    "margin_span": (-2.0, 2.0),
    "alpha": (0.0, 100.0),
}
SEED_RANGE = (0, 2**63 - 1)
# How much of a user's value an error message shows: a message is one line, never the whole input.
SHOWN_CHARACTERS = 200
# Settings every method takes (what it is, its budget) or that carry checks of their own.
_ALWAYS_TAKEN = frozenset({"method", "preset", "target_tokens", "keep_ratio", "energy_share"})


def shown(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a user's value may be huge).

    Large containers are not rendered whole: only their type and length are shown.
    """
    if isinstance(value, (dict, list, tuple, set, frozenset)) and len(value) > 20:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value) if not isinstance(value, (dict, list, tuple, set, frozenset)) else _short_repr(value, limit)
    except (RecursionError, ValueError, MemoryError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _short_repr(value: Any, limit: int) -> str:
    """``repr`` of a small container whose items may themselves be large (each item cut to ``limit``)."""
    if isinstance(value, dict):
        items = (f"{shown(key, limit)}: {shown(item, limit)}" for key, item in value.items())
        opening, closing = "{", "}"
    else:
        items = (shown(item, limit) for item in value)
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")") if isinstance(value, tuple) else "{}"
    text = ""
    for item in items:
        text += (", " if text else "") + item
        if len(text) > limit:
            break
    return f"{opening}{text}{closing}"


def _same_setting(value: Any, default: Any) -> bool:
    """``value == default``, where True is not 1 (a bool is never a number's default)."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def check_keep_ratio(keep_ratio: float) -> float:
    """``keep_ratio`` as a float, or a ValueError naming the allowed range."""
    # numbers.Real admits numpy scalars (np.float32 is not a float subclass, np.float64 is).
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
        raise ValueError(f"keep_ratio must be a number in (0.5, 1.0], got {shown(keep_ratio)}")
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
            ``"cdpruner"`` (a DPP conditioned on the prompt). PiToMe's small-budget method
            ``"mllm"``: keep the patches of lowest energy and those the class token attends to
            most at the layer the model reads, merge every other patch into its most similar kept
            one (tower unmerged). See docs/methods.md; what each method can do is declared in
            `pitome_mllm.methods`.
        keep_ratio: fraction of tokens each merging layer keeps, in (0.5, 1.0]. With
            ``target_tokens`` set and ``keep_ratio`` left as None, it is solved so that
            the tower lands just above the budget.
        preset: ``"reference"`` (authors' released LLaVA code), ``"paper"`` (the schedule
            behind the paper's LLaVA table), ``"pure"`` (the paper's algorithm) or ``"mllm"``
            (the defaults of method ``"mllm"``). ``method="pitome", preset="mllm"`` is another
            spelling of ``method="mllm"``: both become ``method="mllm", preset="mllm"``, and
            ``method="mllm"`` with the default preset takes its own.
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
        energy_share: method ``"mllm"`` only: the fraction of ``target_tokens`` kept because
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
                raise ValueError(f"{name} must be one of {allowed}, got {shown(value)}")

        choice("method", ALL_METHODS)
        choice("preset", PRESETS)
        self._resolve_preset_spelling()
        choice("metric", METRICS, optional=True)
        choice("reduce", REDUCES, optional=True)
        choice("energy", ENERGY_KINDS, optional=True)
        if self.keep_ratio is not None:
            self.keep_ratio = check_keep_ratio(self.keep_ratio)
        if self.target_tokens is not None:
            if isinstance(self.target_tokens, bool) or not isinstance(self.target_tokens, numbers.Integral):
                raise ValueError(f"target_tokens must be a positive integer, got {shown(self.target_tokens)}")
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
        self._validate_projector_method()
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {shown(self.seed)}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {shown(self.seed)}")
        self.seed = int(self.seed)
        if self.keep_ratio is None and self.target_tokens is None and self.method != "none":
            raise ValueError(f"method={self.method!r} needs keep_ratio (in (0.5, 1.0]) or target_tokens")
        for name in ("prop_attn", "keep_order"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {shown(value)}")
        # Not preset-derived, so None (unset) is not allowed either.
        if not isinstance(self.llm_prop_attn, bool):
            raise ValueError(f"llm_prop_attn must be True or False, got {shown(self.llm_prop_attn)}")
        for name, (low, high) in NUMBER_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {shown(value)}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
            setattr(self, name, float(value) if not isinstance(value, int) else value)
        self._refuse_ignored_settings()

    def _refuse_ignored_settings(self) -> None:
        """One rule for every setting a method does not read: left at its default, or refused with the reason.

        The default of a field is its dataclass default or, for the preset-derived fields, the
        preset's value (a saved config carries those, whatever its method).
        """
        read = fields_read(self.method, self.target_tokens is not None)
        label = method_label(self.method, self.preset)
        for field in dataclasses.fields(self):
            name = field.name
            if name in read or name in _ALWAYS_TAKEN:
                continue
            value = getattr(self, name)
            defaults = (field.default, PRESET_DEFAULTS[self.preset].get(name))
            if value is None or any(_same_setting(value, default) for default in defaults):
                continue
            readers = methods_reading(name)
            if method_spec(self.method).stage == TOWER and self.target_tokens is None and self.method in readers:
                reason = "it is read only by the PiToMe step that lands on target_tokens; set target_tokens or drop it"
            else:
                reason = f"drop it, or choose a method that reads it ({', '.join(readers)})"
            raise ValueError(f"{label} does not read {name}, so {name}={shown(value)} would be ignored; {reason}")

    def _resolve_preset_spelling(self) -> None:
        """``preset="mllm"`` is a spelling of ``method="mllm"``: both end as ``method="mllm", preset="mllm"``."""
        owner = method_of_preset(self.preset)
        own_preset = method_spec(self.method).own_preset
        if owner is not None and self.method != owner:
            if self.method != PRESET_ALIAS_METHOD:
                raise ValueError(
                    f"preset={self.preset!r} is a PiToMe setting (the same as method={owner!r}): method must be "
                    f"{PRESET_ALIAS_METHOD!r}, got method={self.method!r}"
                )
            self.method = owner
        elif own_preset is not None and self.preset != own_preset:
            if self.preset != DEFAULT_PRESET:
                raise ValueError(
                    f"method={self.method!r} brings its own preset: preset must be {own_preset!r} or the default "
                    f"{DEFAULT_PRESET!r}, got preset={self.preset!r}"
                )
            self.preset = own_preset

    def _validate_projector_method(self) -> None:
        """The constraints of the methods that reduce at the projector, and settings only some methods read."""
        spec = method_spec(self.method)
        label = method_label(self.method, self.preset)
        if self.energy_share is not None:
            value = self.energy_share
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"energy_share must be a number in [0, 1], got {shown(value)}")
            if "energy_share" not in spec.reads:
                readers = methods_reading("energy_share")
                presets = tuple(method_spec(name).own_preset for name in readers)
                raise ValueError(
                    f"energy_share is a setting of preset {presets}, got preset={self.preset!r} "
                    f"(method={self.method!r}); drop energy_share or choose "
                    f"{' or '.join(f'method={name!r}' for name in readers)}"
                )
            self.energy_share = float(value)
        if not spec.needs_target_tokens:
            return
        if self.target_tokens is None or self.target_tokens < 1:
            raise ValueError(
                f"{label} needs target_tokens (the exact budget per image, >= 1), got {self.target_tokens!r}"
            )
        if self.keep_ratio is not None and self.keep_ratio != 1.0:
            raise ValueError(
                f"{label} leaves the vision tower unmerged: keep_ratio must be None or 1.0, got {self.keep_ratio}"
            )
        if self.prop_attn and "prop_attn" not in spec.reads and spec.own_preset is not None:
            # A method with its own preset refuses a tower setting it would ignore; the baselines
            # have always ignored the preset's prop_attn.
            raise ValueError(f"{label} leaves the tower unmerged, so prop_attn=True would do nothing; drop it")

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
        return method_spec(self.method).stage != TOWER

    @property
    def merges_in_tower(self) -> bool:
        if not method_spec(self.method).merges_in_tower:
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
        """A config from JSON text (starting with ``{``) or a JSON file; errors name the file or the text.

        Raises:
            FileNotFoundError: a path that does not exist.
            ValueError: text that is not a JSON object of config fields, or a bad value.
        """
        return cls.from_dict(read_config_fields(text_or_path))

    def replace(self, **overrides: Any) -> PiToMeConfig:
        """A new validated config with some fields changed."""
        values = self.to_dict()
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(values)}")
        overrides = {**overrides, **self._pair_overrides(overrides)}
        # Preset-derived fields follow a new preset unless given explicitly.
        new_method = overrides.get("method", self.method)
        new_preset = overrides.get("preset", self.preset)
        if new_method in ALL_METHODS and new_preset == DEFAULT_PRESET:
            new_preset = method_spec(new_method).own_preset or new_preset  # what the new config resolves to
        if new_preset != self.preset:
            for name in PRESET_DEFAULTS[self.preset]:
                if values[name] == PRESET_DEFAULTS[self.preset][name]:
                    values[name] = None
        values.update(overrides)
        return PiToMeConfig(**values)

    def _pair_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """A method with its own preset moves as a pair: leaving one half leaves the other.

        ``replace(preset="reference")`` of ``method="mllm"`` is PiToMe with that preset, and
        ``replace(method="fastervlm")`` drops the mllm preset for the default one.
        """
        if method_spec(self.method).own_preset is None or ("method" in overrides) == ("preset" in overrides):
            return {}
        if "method" in overrides and overrides["method"] != self.method:
            return {"preset": DEFAULT_PRESET}
        if "preset" in overrides and overrides["preset"] != self.preset:
            return {"method": PRESET_ALIAS_METHOD}
        return {}


def read_config_fields(text_or_path: str | Path) -> dict[str, Any]:
    """The JSON object of config fields in ``text_or_path`` (JSON text starting with ``{``, or a file), unvalidated.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: text that is not a JSON object; the message names the file or says it was text.
    """
    is_text = str(text_or_path).lstrip().startswith("{")
    where = "config JSON" if is_text else f"config file {shown(str(text_or_path))}"
    if is_text:
        text = str(text_or_path)
    else:
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist (give a JSON file or JSON text starting with '{{')")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{where} cannot be read: {error}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{where} must hold a JSON object of config fields, got {shown(values)}")
    return values

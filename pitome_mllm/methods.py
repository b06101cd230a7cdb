"""The reduction methods and what each one can do, as data (no torch, importable by `pitome_mllm.config`).

One `MethodSpec` per value of ``PiToMeConfig.method``. Everything that asks "does this method fit
here?" (the config's validation, the model adapters, the vLLM plugin, the command line) asks the
spec's capabilities, never the method's name, so a new method or a new tower (one without a class
token, one that merges after a patch merger) is a table row and a question, not a search for names.

The tensor implementations of the projector-stage methods live in `pitome_mllm.merge.reducers`,
looked up by `MethodSpec.implementation`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where a method reduces the visual tokens.
TOWER = "tower"  # a schedule of merge steps inside the vision tower (keep_ratio), then an optional exact trim
PROJECTOR = "projector"  # the tower runs unmerged; one stage at the projector lands exactly on target_tokens
STAGES = (TOWER, PROJECTOR)

# What a method is, for grouping in tables and the public name tuples of `pitome_mllm.config`.
MERGE = "merge"  # similarity merging planned over the tower's layers (PiToMe, ToMe)
NO_REDUCTION = "none"  # no tower merging (only the optional projector-stage PiToMe step)
SELECTION = "selection"  # a published baseline that chooses or pools patches to the budget
SELECT_MERGE = "select_merge"  # PiToMe's small-budget method: select, then merge the rest into the kept tokens
KINDS = (MERGE, NO_REDUCTION, SELECTION, SELECT_MERGE)

# Config fields every method reads (the budget, and the LLM-side proportional attention).
_COMMON = frozenset({"method", "target_tokens", "llm_prop_attn"})
# Fields of the projector-stage PiToMe step that trims a tower-planned method to target_tokens.
_PROJECTOR_STEP = frozenset({"keep_order", "reduce", "margin_start", "margin_span", "alpha", "energy", "preset"})
# Fields of the schedule inside the tower.
_TOWER_SCHEDULE = frozenset({"keep_ratio", "metric", "prop_attn"})
# Fields of PiToMe's energy: a PiToMe step reads them, ToMe's bipartite matching does not.
_ENERGY = frozenset({"margin_start", "margin_span", "alpha", "energy"})


@dataclass(frozen=True)
class MethodSpec:
    """One reduction method and its capabilities.

    Attributes:
        name: the value of ``PiToMeConfig.method``.
        kind: `MERGE`, `NO_REDUCTION`, `SELECTION` or `SELECT_MERGE`.
        stage: `TOWER` (the vision tower is planned with a schedule; ``keep_ratio`` or a solved one)
            or `PROJECTOR` (the tower stays unmerged; exactly ``target_tokens`` at the projector).
        reads: the `PiToMeConfig` fields the method reads; a field outside it does not change
            what the method computes.
        implementation: the name of the tensor implementation in `pitome_mllm.merge.reducers`
            (projector-stage methods; two names may share one).
        after_projector: decides on the projected tokens (a hook on the projector's output)
            rather than on the vision features before it.
        needs_class_attention: ranks patches by the class token's attention in the read layer,
            so it needs a tower with a class token and that layer's queries and keys.
        needs_prompt: conditions the choice on each image's prompt.
        exact_at_keep_all: keeping every token reproduces the unpatched model bit for bit.
        merges_patches: an output token may hold several patches (a mean), not only one.
        pools_grid: pools the patch grid into an ``h x w`` grid of the budget, so it needs a
            rectangular patch grid and a budget that factors into one.
        own_preset: the preset whose defaults the method brings (its fields' defaults); the
            preset name alone is accepted as a spelling of the method (``preset="mllm"``).
        reads_without_target: what a tower-planned method reads when ``target_tokens`` is unset
            (no projector-stage PiToMe step runs); None: `reads` (see `fields_read`).
    """

    name: str
    kind: str
    stage: str
    reads: frozenset[str]
    implementation: str | None = None
    after_projector: bool = False
    needs_class_attention: bool = False
    needs_prompt: bool = False
    exact_at_keep_all: bool = True
    merges_patches: bool = False
    pools_grid: bool = False
    own_preset: str | None = None
    reads_without_target: frozenset[str] | None = None

    @property
    def needs_class_token(self) -> bool:
        """The tower must carry a class token (its attention row is what ranks the patches)."""
        return self.needs_class_attention

    @property
    def works_without_class_token(self) -> bool:
        return not self.needs_class_token

    @property
    def in_vllm(self) -> bool:
        """Runs in the vLLM plugin: vLLM encodes images without their prompt."""
        return not self.needs_prompt

    @property
    def needs_target_tokens(self) -> bool:
        """A projector-stage method has no budget of its own: ``target_tokens`` is required."""
        return self.stage == PROJECTOR

    @property
    def merges_in_tower(self) -> bool:
        return self.kind == MERGE


def _selection(name: str, reads: frozenset[str] = frozenset(), **capabilities) -> MethodSpec:
    # Proportional attention in the LLM weighs tokens by the patches they hold: all 1 without merging.
    common = _COMMON if capabilities.get("merges_patches") else _COMMON - {"llm_prop_attn"}
    return MethodSpec(
        name,
        SELECTION,
        PROJECTOR,
        common | reads,
        implementation=capabilities.pop("implementation", name),
        **capabilities,
    )


# The registry, in the order the command line and the docs list the methods.
METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("pitome", MERGE, TOWER, _COMMON | _PROJECTOR_STEP | _TOWER_SCHEDULE, merges_patches=True),
        MethodSpec(
            "tome",
            MERGE,
            TOWER,
            _COMMON | _PROJECTOR_STEP | _TOWER_SCHEDULE,
            merges_patches=True,
            reads_without_target=(_COMMON | _PROJECTOR_STEP | _TOWER_SCHEDULE) - _ENERGY,
        ),
        # Without target_tokens nothing runs: the model is the unpatched one.
        MethodSpec(
            "none",
            NO_REDUCTION,
            TOWER,
            _COMMON | _PROJECTOR_STEP,
            merges_patches=True,
            reads_without_target=_COMMON - {"llm_prop_attn"},
        ),
        _selection("random", frozenset({"seed"})),
        _selection("pool", merges_patches=True, pools_grid=True),
        # VisionZip's dominant + contextual tokens (at keep-all every patch, in raster order).
        _selection("dominant", needs_class_attention=True, merges_patches=True),
        _selection("visionzip", implementation="dominant", needs_class_attention=True, merges_patches=True),
        _selection("fastervlm", needs_class_attention=True),
        _selection("divprune", after_projector=True),
        _selection("cdpruner", after_projector=True, needs_prompt=True),
        MethodSpec(
            "mllm",
            SELECT_MERGE,
            PROJECTOR,
            _COMMON | frozenset({"preset", "metric", "energy_share", "margin_start", "margin_span", "alpha", "energy"}),
            implementation="select_merge",
            needs_class_attention=True,
            merges_patches=True,
            own_preset="mllm",
        ),
    )
}
METHOD_NAMES = tuple(METHOD_SPECS)


def method_spec(method: str) -> MethodSpec:
    """The `MethodSpec` of ``method``, or a ValueError naming the known methods."""
    try:
        return METHOD_SPECS[method]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {METHOD_NAMES}, got {repr(method)[:200]}") from None


def methods_where(**capabilities: object) -> tuple[str, ...]:
    """The names of the methods whose capabilities (spec attributes or properties) all equal the given values.

    >>> methods_where(needs_prompt=True)
    ('cdpruner',)
    """
    for capability in capabilities:
        if not hasattr(METHOD_SPECS["pitome"], capability):
            raise ValueError(f"unknown method capability {capability!r}")
    return tuple(
        name
        for name, spec in METHOD_SPECS.items()
        if all(getattr(spec, capability) == value for capability, value in capabilities.items())
    )


def methods_reading(field: str) -> tuple[str, ...]:
    """The names of the methods that read the config field ``field``.

    >>> methods_reading("energy_share")
    ('mllm',)
    """
    return tuple(name for name, spec in METHOD_SPECS.items() if field in spec.reads)


def fields_read(method: str, with_target_tokens: bool) -> frozenset[str]:
    """The config fields ``method`` reads when ``target_tokens`` is (or is not) set.

    `MethodSpec.reads` is what a method can read; a tower-planned method reads the fields of the
    projector-stage PiToMe step only when that step runs (``target_tokens`` set): ``tome`` alone
    has no energy, and ``none`` alone changes nothing.

    >>> sorted(fields_read("tome", False) & {"alpha", "metric"})
    ['metric']
    """
    spec = method_spec(method)
    if with_target_tokens or spec.reads_without_target is None:
        return spec.reads
    return spec.reads_without_target


def method_of_preset(preset: str) -> str | None:
    """The method whose own preset ``preset`` is (``"mllm"`` -> ``"mllm"``), or None."""
    return next((spec.name for spec in METHOD_SPECS.values() if spec.own_preset == preset), None)


def method_label(method: str, preset: str) -> str:
    """How messages name a method: ``method='fastervlm'``; with its own preset ``method='mllm' with preset='mllm'``."""
    spec = METHOD_SPECS.get(method)
    if spec is not None and spec.own_preset is not None and spec.own_preset == preset:
        return f"method={method!r} with preset={preset!r}"
    return f"method={method!r}"


# What a missing capability means, for the refusals of `capability_error`.
CAPABILITY_NEEDS = {
    "needs_class_token": "ranks patches by the class token's attention",
    "needs_prompt": "conditions the selection on each image's prompt",
}


def capability_error(label: str, capability: str, reason: str) -> ValueError:
    """The refusal of a method whose ``capability`` the model (or engine) cannot serve; the message names it.

    ``label`` names the method (`method_label`); ``reason`` says what is missing and what is allowed,
    starting with its own punctuation (``"; ... has no class token"``).
    """
    if capability not in CAPABILITY_NEEDS:
        raise ValueError(f"capability must be one of {tuple(CAPABILITY_NEEDS)}, got {capability!r}")
    return ValueError(f"{label} {CAPABILITY_NEEDS[capability]}{reason} (method capability: {capability})")


__all__ = [
    "CAPABILITY_NEEDS",
    "KINDS",
    "MERGE",
    "METHOD_NAMES",
    "METHOD_SPECS",
    "NO_REDUCTION",
    "PROJECTOR",
    "SELECTION",
    "SELECT_MERGE",
    "STAGES",
    "TOWER",
    "MethodSpec",
    "capability_error",
    "fields_read",
    "method_label",
    "method_of_preset",
    "method_spec",
    "methods_reading",
    "methods_where",
]

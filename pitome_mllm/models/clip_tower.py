"""The family-independent part of an adapter for a CLIP-style tower + projector.

Subclasses (one per model family) say where the vision tower, the projector and the
feature selection are (`ModelAdapter.parts`); this class plans the merge schedule,
checks budgets, and installs / removes the tower and projector hooks. The helpers
(`clip_encoder_layers`, `last_encoder_layer`, ...) serve every family with such a tower.
"""

from __future__ import annotations

from torch import nn

from ..config import PiToMeConfig
from ..geometry import ImageResize, PatchGrid, TowerBudget, TowerGeometry
from ..hooks.base import Hook
from ..hooks.projector import ProjectorMerger, ProjectorSettings, SelectionSettings, SelectionStage
from ..hooks.state import PatchState
from ..hooks.tower import KeySource, MergeSettings, TowerMerger
from ..merge.budget import StepParams
from ..merge.select import pool_grid, square_grid
from ..methods import PROJECTOR, capability_error, method_label, method_spec
from ..schedule import LayerStep, margin_for_layer, projector_margin
from .compat import encoder_layers_return_tuple
from .protocol import ModelAdapter, ModelParts
from .siglip import CLASS_TOKEN_OF_TOWER, tower_has_class_token


def clip_encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a transformers CLIP vision model."""
    # transformers >= 5.12 keeps the encoder on CLIPVisionModel itself; 4.x and 5.0 one level down.
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        encoder = getattr(owner, "encoder", None)
        if encoder is not None and isinstance(getattr(encoder, "layers", None), nn.ModuleList):
            return encoder.layers
    raise ValueError(f"cannot find the encoder layers of {type(vision_tower).__name__}")


def single_feature_layer(feature_layer):
    """``feature_layer`` as one integer where it names one layer (``-2``, or a one-element list ``[-2]``).

    transformers concatenates the hidden states a list names, so a one-element list reads exactly
    what its integer reads; longer lists (and anything else) are returned as they are.
    """
    if isinstance(feature_layer, (list, tuple)) and len(feature_layer) == 1:
        return feature_layer[0]
    return feature_layer


def last_encoder_layer(feature_layer: int, num_layers: int, supported: str = "one integer") -> int:
    """The encoder layer whose output ``hidden_states[feature_layer]`` is.

    ``hidden_states`` has ``num_layers + 1`` entries: index 0 is the embedding output and
    index ``i`` the output of layer ``i - 1``; negative indices count from the end.

    Raises:
        ValueError: ``feature_layer`` is not an integer in ``[-(num_layers + 1), num_layers]``
            (the message names ``supported``), or selects the embedding output (no encoder
            layer to merge in).
    """
    feature_layer = single_feature_layer(feature_layer)
    if isinstance(feature_layer, (list, tuple)):
        raise ValueError(f"the vision feature layer {feature_layer!r} selects several layers; supported: {supported}")
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"the vision feature layer must be an integer, got {feature_layer!r}; supported: {supported}")
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"vision feature layer {feature_layer} is out of range for a tower of {num_layers} layers; "
            f"allowed: {-(num_layers + 1)} .. {num_layers} (hidden_states has {num_layers + 1} entries)"
        )
    last_layer = feature_layer % (num_layers + 1) - 1
    if last_layer < 0:
        raise ValueError(
            f"the vision feature layer {feature_layer} selects the patch embeddings; no encoder layer to merge in"
        )
    return last_layer


def clip_query_key_projections(layer: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    """A CLIP encoder layer's query and key projections and its number of heads."""
    attention = layer.self_attn
    return attention.q_proj, attention.k_proj, attention.num_heads


def clip_key_projection(layer: nn.Module) -> KeySource:
    """A CLIP encoder layer's key projection and its number of heads."""
    attention = layer.self_attn
    return KeySource(attention.k_proj, attention.num_heads)


def tower_config_geometry(
    vision_config, feature_layer: int, drops_class_token: bool, num_layers: int | None = None, resize=None
) -> TowerGeometry:
    """The geometry of a CLIP or SigLIP tower read at ``feature_layer``, from its config alone.

    Args:
        vision_config: the tower's config (``CLIPVisionConfig`` / ``SiglipVisionConfig``; its
            ``model_type`` says whether a class token exists).
        feature_layer: the ``hidden_states`` index the model reads.
        drops_class_token: the model drops the first token before the projector.
        num_layers: layers of the whole tower (default: the config's ``num_hidden_layers``).
        resize: the image processor's `ImageResize` (None: the native size).

    Raises:
        ValueError: another tower, a feature layer that is not one integer in range, or a class
            token dropped from a tower that has none.
    """
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in CLASS_TOKEN_OF_TOWER:
        raise ValueError(
            f"pitome_mllm merges in CLIP and SigLIP towers; this LLaVA has a {model_type!r} tower "
            f"(supported: {', '.join(CLASS_TOKEN_OF_TOWER)})"
        )
    num_layers = vision_config.num_hidden_layers if num_layers is None else num_layers
    return clip_geometry(
        vision_config,
        num_layers,
        last_encoder_layer(feature_layer, num_layers, "one integer"),
        CLASS_TOKEN_OF_TOWER[model_type],
        drops_class_token,
        tower_name=f"a {model_type} tower",
        resize=resize,
    )


def clip_geometry(
    vision_config,
    num_layers: int,
    last_layer: int,
    class_token: bool,
    drops_class_token: bool,
    tower_name: str,
    resize=None,
) -> TowerGeometry:
    """The `TowerGeometry` of a CLIP-style tower (square native images of ``image_size``, one patch grid).

    Raises:
        ValueError: the class token is dropped from a tower (named ``tower_name``) that has none.
    """
    if drops_class_token and not class_token:
        raise ValueError(
            f"vision_feature_select_strategy='default' drops the first token, but {tower_name} has no class "
            "token (it would drop a patch); supported with this tower: 'full'"
        )
    return TowerGeometry(
        num_layers=num_layers,
        last_layer=last_layer,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        class_token=class_token,
        drops_class_token=drops_class_token,
        resize=resize,
    )


def parts_geometry(parts: ModelParts, resize: ImageResize | None = None) -> TowerGeometry:
    """The `TowerGeometry` of a loaded CLIP or SigLIP tower (its config, depth, read layer and class token)."""
    return clip_geometry(
        parts.tower.config,
        len(parts.encoder_layers),
        parts.last_layer,
        tower_has_class_token(parts.tower),
        parts.drops_class_token,
        tower_name=type(parts.tower).__name__,
        resize=resize,
    )


class ClipTowerAdapter(ModelAdapter):
    """Plans and installs merging on a CLIP tower and a per-token projector.

    Construction validates and plans without touching the model; `install` mutates it
    and `remove` undoes exactly what `install` did. Subclasses implement `matches` and
    `parts`; the tower, projector and feature selection come from ``parts(model)``, and
    add their own units after the tower and projector ones (`hooks`).

    Args:
        model: the whole model (kept for logging and the handle).
        processor: the processor or None.
        config: the validated config.
    """

    family = "clip"
    supported = "a CLIP or SigLIP vision tower"

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        super().__init__(model, processor, config)
        parts = self.parts(model)
        self.vision_tower = parts.tower
        self.projector = parts.projector
        self.layers = parts.encoder_layers
        geometry = self.geometry(parts, self.image_resize(processor))
        self.tower_geometry = geometry
        # CLIP carries a class token at index 0, SigLIP none; planning, merging and counts follow.
        self.class_token = geometry.class_token
        self.num_layers = geometry.num_layers
        self.last_layer = geometry.last_layer
        self.patch_size = geometry.patch_size
        self.default_num_tokens = geometry.default_num_tokens
        self.drops_class_token = geometry.drops_class_token
        self.budget = TowerBudget(geometry, config)  # validates the budget; nothing is touched yet
        self.tower_method = self.budget.tower_method
        self.tower_keep_ratio = self.budget.keep_ratio

        self.state = PatchState()
        # The prompt source of the instruction-conditioned methods, where it is a unit of its own.
        self.instructions = None
        self.tower = TowerMerger(
            self.layers,
            self.plan,
            self.last_layer,
            MergeSettings(
                # An unmerged tower (method none, the selection methods, the mllm preset) decides nothing on
                # the layers' keys, so it captures none: otherwise every layer's keys would be copied per forward.
                metric=config.metric if self.tower_method != "none" else "hidden",
                prop_attn=config.prop_attn,
                class_token=self.class_token,
                step=StepParams(alpha=config.alpha, reduce=config.reduce),
            ),
            self.state,
            **self.tower_merger_options(),
        )
        if method_spec(config.method).stage == PROJECTOR:
            self.projector_stage = self._selection_stage()
        else:
            self.projector_stage = ProjectorMerger(
                self.projector,
                self.state,
                ProjectorSettings(
                    target_tokens=config.target_tokens,
                    keep_order=config.keep_order,
                    drops_class_token=self.drops_class_token,
                    step=StepParams(
                        margin=projector_margin(self.num_layers, config.margin_start, config.margin_span),
                        alpha=config.alpha,
                        energy=config.resolved_energy,
                        reduce=config.reduce,
                    ),
                ),
            )

    def _selection_stage(self) -> SelectionStage:
        """The projector stage of a method that reduces at the projector, after checking the model fits."""
        config = self.config
        spec = method_spec(config.method)
        # Towers without a class token (SigLIP) have nothing to drop.
        has_class_token = self.class_token
        if self.drops_class_token != has_class_token:
            raise ValueError(
                f"method={config.method!r} selects among patch tokens only, but this model hands the class token "
                "to the projector (vision_feature_select_strategy='full'); supported: 'default'"
            )
        num_patches = self.default_num_tokens - int(self.drops_class_token)
        if spec.pools_grid:
            pool_grid(config.target_tokens, square_grid(num_patches))  # ValueError naming nearby budgets
        query_key, num_heads = None, 1
        if spec.needs_class_token:
            if not has_class_token:
                raise capability_error(
                    method_label(config.method, config.preset),
                    "needs_class_token",
                    f"; {type(self.vision_tower).__name__} has no class token",
                )
            query_key = self.query_key_sources(self.layers[self.last_layer])
            num_heads = query_key[1].num_heads
        self.instructions = self._instruction_source() if spec.needs_prompt else None
        settings = SelectionSettings(
            method=config.method,
            target_tokens=config.target_tokens,
            seed=config.seed,
            drops_class_token=self.drops_class_token,
            num_heads=num_heads,
            metric=config.metric,
            energy_share=config.energy_share if config.energy_share is not None else 0.5,
            step=StepParams(
                # The energy of the layer whose output is read (the tower's margin schedule at that layer).
                margin=margin_for_layer(self.last_layer, self.num_layers, config.margin_start, config.margin_span),
                alpha=config.alpha,
                energy=config.resolved_energy,
                reduce=config.reduce,
            ),
        )
        return SelectionStage(self.projector, self.state, settings, query_key, self.instructions)

    def _instruction_source(self):
        """``num_images -> [T_b, D] prompt embeddings of each image`` for instruction-conditioned methods.

        Families that can see the prompt next to the images override this; here it refuses.
        """
        raise capability_error(
            method_label(self.config.method, self.config.preset),
            "needs_prompt",
            f", which the {self.family} family does not hand to the projector; supported: llava_hf (transformers "
            "LlavaForConditionalGeneration / LlavaModel)",
        )

    # ------------------------------------------------------------- the family's shape
    @classmethod
    def geometry(cls, parts: ModelParts, resize: ImageResize | None = None) -> TowerGeometry:
        """The token geometry of a model's tower, from its `ModelParts` (``resize``: the processor's rule)."""
        return parts_geometry(parts, resize)

    @classmethod
    def image_resize(cls, processor) -> ImageResize | None:
        """The processor's rule from an original image to the tower's pixels; None: the native size."""
        del processor  # families whose processor resizes override this
        return None

    def query_key_sources(self, layer: nn.Module) -> tuple[KeySource, KeySource]:
        """Where one encoder layer's attention queries and keys can be read (the class-token methods)."""
        query, key, num_heads = clip_query_key_projections(layer)
        return KeySource(query, num_heads), KeySource(key, num_heads)

    def tower_merger_options(self) -> dict:
        """Keyword arguments of `TowerMerger` that depend on how the family's layers are written."""
        return {"key_projection": clip_key_projection, "layers_return_tuple": encoder_layers_return_tuple()}

    # -------------------------------------------------------------- planning
    def plan(self, num_tokens: int) -> list[LayerStep]:
        """Merge steps of layers ``0..last_layer`` for an input of ``num_tokens`` (class token, if any, included)."""
        return self.budget.plan(num_tokens)

    def tower_output_tokens(self, num_tokens: int) -> int:
        """Visual tokens the projector receives per image (after the class token is dropped)."""
        return self.budget.tower_output_tokens(num_tokens)

    def visual_tokens_for(self, num_tokens: int) -> int:
        """Visual tokens the language model receives per image, for ``num_tokens`` tower inputs."""
        return self.budget.visual_tokens_for(num_tokens)

    @property
    def num_visual_tokens(self) -> int:
        return self.budget.num_visual_tokens

    def image_grids(self, height: int, width: int) -> tuple[PatchGrid, ...]:
        """The one patch grid of the processed image (the processor's resize rule on the original size)."""
        return (self.tower_geometry.grid_for_image(height, width),)

    def visual_tokens_for_image(self, height: int, width: int) -> int:
        """Placeholders for an original ``height x width`` image, after the processor's resize rule.

        Without a processor (or for a family whose processor is not read) the image is taken at
        the tower's native size, as LLaVA-1.5's own processor brings every image there.
        """
        return self.budget.visual_tokens_for_image(height, width)

    def record_merges(self, enabled: bool) -> None:
        self.tower.record_merges = enabled

    # --------------------------------------------------------------- install
    def hooks(self) -> list[Hook]:
        """The tower, the prompt recorder of instruction methods (a `Hook` where the family has one), the
        projector stage; families add theirs after these."""
        prompt = [self.instructions] if isinstance(self.instructions, Hook) else []
        return [self.tower, *prompt, self.projector_stage]

    def describe(self) -> str:
        steps = self.plan(self.default_num_tokens)
        merge_steps = sum(step.method != "none" for step in steps)
        return (
            f"{self.config.method}, keep_ratio={self.tower_keep_ratio:.4f}, {merge_steps} merge steps, "
            f"{self.num_visual_tokens} visual tokens per image"
        )

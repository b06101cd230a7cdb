"""The adapter for vLLM's own LLaVA-1.5 model (``vllm.model_executor.models.llava``).

vLLM rebuilds the model out of its own layers: the CLIP tower keeps only the layers the
model reads (``vision_feature_layer=-2`` builds 23 of 24), each attention has one fused
``qkv_proj`` whose output is ``(tensor, bias)``, the encoder layers are called with the
hidden states alone (`MMEncoderAttention` takes no mask), and the projector is
``multi_modal_projector``. This adapter says so to the shared CLIP-tower machinery
(`ClipTowerAdapter`): the schedule, the merges and the budget are the same code as for
transformers, so the same config gives the same token counts and the same merges.

Token counts depend on the Hugging Face config alone (`config_geometry`, the transformers adapter's
own), which is what vLLM's prompt processing needs: it expands every image placeholder before any
encoder runs.

Nothing here imports vLLM: `matches` reads class names, so the registry can ask it of any model.
"""

from __future__ import annotations

from torch import nn

from ..config import PiToMeConfig
from ..geometry import ImageResize, TowerBudget, TowerGeometry
from ..hooks.tower import KeySource
from ..methods import capability_error, method_label, method_spec, methods_where
from .clip_tower import ClipTowerAdapter, tower_config_geometry
from .llava_hf import config_geometry
from .protocol import ModelParts

FAMILY = "vllm_llava"
SUPPORTED = "vLLM's LlavaForConditionalGeneration with a CLIP or SigLIP tower"
# The methods the plugin runs (vLLM encodes images without their prompt).
VLLM_METHODS = methods_where(in_vllm=True)


def is_vllm_llava(model: nn.Module) -> bool:
    """Whether ``model`` is (a subclass of) vLLM's ``LlavaForConditionalGeneration``."""
    return any(
        cls.__name__ == "LlavaForConditionalGeneration" and cls.__module__.startswith("vllm.")
        for cls in type(model).__mro__
    )


def check_vllm_config(config: PiToMeConfig) -> None:
    """Refuse the settings that cannot run inside vLLM, each with its reason (before anything is built)."""
    if config.llm_prop_attn:
        raise ValueError(
            "llm_prop_attn=True is not supported in vLLM: its paged-attention kernels take no per-key bias, so "
            "the language model cannot weight merged tokens by size; leave llm_prop_attn off"
        )
    if config.prop_attn:
        raise ValueError(
            "prop_attn=True is not supported in vLLM: its vision attention (MMEncoderAttention) takes no mask or "
            "bias, and adding one would drop the fused attention path; use a preset without it "
            "(preset='reference' or 'paper')"
        )
    if method_spec(config.method).needs_prompt:
        raise capability_error(
            method_label(config.method, config.preset),
            "needs_prompt",
            ", which vLLM does not hand to the vision encoder (embed_multimodal sees the images only); supported "
            f"in vLLM: {', '.join(VLLM_METHODS)}",
        )


def planned_budget(hf_config, config: PiToMeConfig) -> TowerBudget:
    """The `TowerBudget` of a LLaVA config patched with ``config`` (what prompt processing counts with).

    Raises:
        ValueError: settings vLLM cannot run, or a budget the tower cannot reach (the same
            messages `pitome_mllm.patch` gives).
    """
    check_vllm_config(config)
    return TowerBudget(config_geometry(hf_config), config)


def fused_source(layer: nn.Module, part: int) -> KeySource:
    """Third ``part`` (0 queries, 1 keys, 2 values) of one vLLM encoder layer's fused ``qkv_proj`` output.

    Under tensor parallelism the output holds this rank's heads only (`check_key_metric_parallelism`).
    """
    attention = layer.self_attn

    def part_of_output(output) -> object:
        qkv = output[0] if isinstance(output, tuple) else output
        return qkv.chunk(3, dim=-1)[part]

    return KeySource(attention.qkv_proj, attention.num_heads_per_partition, part_of_output)


def fused_key_source(layer: nn.Module) -> KeySource:
    """The keys of one vLLM CLIP / SigLIP encoder layer: the middle third of its fused ``qkv_proj`` output."""
    return fused_source(layer, 1)


def check_key_metric_parallelism(layers: nn.ModuleList, config: PiToMeConfig) -> None:
    """Refuse a keys metric when the tower's attention is split over tensor-parallel ranks.

    Each rank would see the keys of its own heads only and decide different merges, so the
    ranks' token sets would disagree. The hidden-state metric is the same on every rank (it is
    read after the all-reduce), and so is the keys metric with a data-parallel tower
    (``mm_encoder_tp_mode="data"``), where each rank holds every head.
    """
    tp_size = getattr(layers[0].self_attn, "tp_size", 1)
    if tp_size == 1:
        return
    if method_spec(config.method).needs_class_attention:
        name = method_label(config.method, config.preset)
        raise ValueError(
            f"{name} reads the class token's attention, whose heads tensor parallelism splits over {tp_size} "
            "ranks (each would keep different tokens); run the vision tower data-parallel "
            "(mm_encoder_tp_mode='data') or choose divprune, random or pool"
        )
    if config.metric != "hidden":
        raise ValueError(
            f"metric={config.metric!r} reads the attention keys, which tensor parallelism splits over "
            f"{tp_size} ranks (each would merge differently); use metric='hidden' (preset='reference'), "
            "or run the vision tower data-parallel (mm_encoder_tp_mode='data')"
        )


def vllm_parts(model: nn.Module) -> ModelParts:
    """The `ModelParts` of a vLLM LLaVA model."""
    hf_config = model.config
    geometry = config_geometry(hf_config)
    tower = model.vision_tower
    layers = tower.vision_model.encoder.layers
    if len(layers) != geometry.last_layer + 1:
        raise ValueError(
            f"vLLM built {len(layers)} vision layers, but vision_feature_layer={hf_config.vision_feature_layer} "
            f"reads the output of layer {geometry.last_layer}"
        )

    def encode_images(pixel_values, **kwargs) -> list:
        return list(model.embed_multimodal(pixel_values=pixel_values, **kwargs))

    return ModelParts(
        tower=tower,
        projector=model.multi_modal_projector,
        language_model=getattr(model, "language_model", None),
        encoder_layers=layers,
        feature_layer=hf_config.vision_feature_layer,
        last_layer=geometry.last_layer,
        drops_class_token=geometry.drops_class_token,
        encode_images=encode_images,
    )


def check_embedding_counts(embeddings, expected: int | list[int]) -> None:
    """Raise unless every image's embeddings number ``expected`` (the placeholders its prompt holds).

    Args:
        embeddings: ``[num_images, K, D]`` or a sequence of ``[K_i, D]``.
        expected: the placeholders per image that prompt processing emitted: one count for every
            image, or one per image (anyres budgets depend on the image size).

    Raises:
        RuntimeError: naming the image, both counts, and why it matters.
    """
    expected_counts = [expected] * len(embeddings) if isinstance(expected, int) else list(expected)
    for index, (image_embeddings, placeholders) in enumerate(zip(embeddings, expected_counts, strict=True)):
        count = image_embeddings.shape[0]
        if count != placeholders:
            raise RuntimeError(
                f"pitome_mllm: image {index} produced {count} visual embeddings, but its prompt holds {placeholders} "
                "placeholders; vLLM would drop the surplus (or fail on too few), so the answer would not see the "
                "image it was given. The merge schedule and the prompt count disagree: report this with the "
                "hf_overrides used"
            )


def images_per_tower_call(encoder_budget_tokens: int, unmerged_tokens_per_image: int) -> int:
    """How many images one tower call may take so its peak memory stays that of the unmerged model.

    vLLM sizes its encoder work in *output* tokens: with ``K`` merged tokens per image it schedules
    (and, on a GPU, profiles memory with) ``budget // K`` images in one call, each still entering
    the tower at full length; at K = 64 of 576 that is 9 times the unmerged peak. Calls of at most
    ``budget // unmerged`` images keep the peak where vLLM planned it for the model unmerged.
    """
    return max(1, encoder_budget_tokens // max(1, unmerged_tokens_per_image))


def embed_in_chunks(embed, pixel_values, images_per_call: int):
    """``embed(pixel_values=...)`` over chunks of at most ``images_per_call`` images, concatenated in order.

    Args:
        embed: ``pixel_values -> [n, K, D]`` embeddings (or a sequence of ``[K, D]``).
        pixel_values: ``[N, 3, H, W]`` or a sequence of ``[3, H, W]``.
    """
    import torch

    if len(pixel_values) <= images_per_call:
        return embed(pixel_values=pixel_values)
    chunks = [pixel_values[start : start + images_per_call] for start in range(0, len(pixel_values), images_per_call)]
    outputs = [embed(pixel_values=chunk) for chunk in chunks]
    if all(isinstance(output, torch.Tensor) for output in outputs):
        return torch.cat(outputs)
    return [embedding for output in outputs for embedding in output]


class VllmLlavaAdapter(ClipTowerAdapter):
    """Merges inside vLLM's LLaVA-1.5 (built by vLLM, before its weights load).

    vLLM's prompt processing counts the placeholders (`planned_budget`), so the adapter
    changes no processor.
    """

    family = FAMILY
    supported = SUPPORTED
    methods = VLLM_METHODS
    processor_counts_placeholders = False

    matches = staticmethod(is_vllm_llava)

    @classmethod
    def parts(cls, model: nn.Module) -> ModelParts:
        return vllm_parts(model)

    @classmethod
    def geometry(cls, parts: ModelParts, resize: ImageResize | None = None) -> TowerGeometry:
        # vLLM builds only the layers read: the config, not the module list, has the tower's depth.
        return tower_config_geometry(
            parts.tower.vision_model.config, parts.feature_layer, parts.drops_class_token, resize=resize
        )

    def __init__(self, model: nn.Module, processor, config: PiToMeConfig) -> None:
        check_vllm_config(config)
        check_key_metric_parallelism(vllm_parts(model).encoder_layers, config)
        super().__init__(model, processor, config)

    def tower_merger_options(self) -> dict:
        return {"key_projection": fused_key_source, "layers_return_tuple": False, "layers_take_mask": False}

    def query_key_sources(self, layer: nn.Module) -> tuple[KeySource, KeySource]:
        return fused_source(layer, 0), fused_source(layer, 1)


__all__ = [
    "VllmLlavaAdapter",
    "check_embedding_counts",
    "check_vllm_config",
    "config_geometry",
    "embed_in_chunks",
    "images_per_tower_call",
    "is_vllm_llava",
    "planned_budget",
]

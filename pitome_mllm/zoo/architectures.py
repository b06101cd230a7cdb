"""Real-size LLaVA and Qwen-VL shapes with random weights, built without any download.

Profiling asks what merging saves on the models people run (CLIP ViT-L/14-336 in front of
a 7B or 13B Llama), but checkpoints cannot always be fetched. The cost of a forward pass
with a fixed token budget depends only on the shapes - layer widths, depths, head counts,
vocabulary - and on how many tokens flow through each layer, never on the weight values.
(Which tokens get merged does depend on the weights; how many does not: the schedule fixes
the count for every layer.) So a model with the right shapes and random weights has the
latency and memory of the real one, and this module builds such models quickly:

* the module tree is created on the ``meta`` device (no memory, no initialisation cost),
* only the parts that will run are materialised on the target device (``to_empty``),
* weights are filled with a tiled block of seeded N(0, 0.02) noise (filling billions of
  values with fresh random numbers on a CPU takes longer than the profile itself), norms
  with ones, biases with zeros, and the non-persistent buffers (position ids, rotary
  frequencies) are recomputed by transformers' own initialisers.

Inputs come from the offline tiny processor (`build_tiny_processor(336, 14)`): its
~500-token tokenizer ids all fit the 32064-token vocabulary, and its image geometry is
CLIP-L/14-336's (577 tokens in the tower, 576 placeholders per image). Qwen-VL shapes (`QwenVLArchSpec`) get
the real processor class with the offline Qwen tokenizer and the released checkpoints' pixel limits
(`pitome_mllm.zoo.tiny_qwen`): a 336 x 336 image is 24 x 24 patches, 144 tokens after the 2 x 2 merger.

>>> spec = ARCHITECTURES["llava-1.5-7b"]
>>> spec.text.hidden_size, spec.vision.num_layers
(4096, 24)
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.compat import transformers_version
from .architecture_specs import (  # noqa: F401  (re-exported: the shapes belong with their builders)
    ARCHITECTURES,
    CLIP_L_336,
    LLAMA2_7B,
    LLAMA2_13B,
    LLAMA_1B,
    LLAVA_VOCAB_SIZE,
    ArchSpec,
    QwenVLArchSpec,
    TextShape,
    VisionShape,
    get_arch,
)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "QwenVLArchSpec",
    "TextShape",
    "VisionShape",
    "arch_config",
    "build_arch",
    "count_parameters",
    "get_arch",
]

INIT_STD = 0.02
# Odd length, so a weight row and the tiled noise block do not line up period by period.
_NOISE_BLOCK_LEN = 1_048_573


def arch_config(spec: ArchSpec | QwenVLArchSpec | str, tokenizer=None):
    """The ``LlavaConfig`` (``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` for a `QwenVLArchSpec`) of ``spec``
    (nothing is allocated).

    Args:
        spec: an `ArchSpec`, a `QwenVLArchSpec` or its name.
        tokenizer: supplies the image-token, pad, BOS and EOS ids (default: the tiny
            offline tokenizer's: image 4, pad 3, BOS 1, EOS 2; for Qwen-VL the offline Qwen tokenizer's).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from .tiny import tower_shape

    spec = get_arch(spec) if isinstance(spec, str) else spec
    if isinstance(spec, QwenVLArchSpec):
        return _qwen_arch_config(spec, tokenizer)
    ids = _special_ids(tokenizer)
    vision, text = spec.vision, spec.text
    shape = tower_shape(
        vision.hidden_size,
        vision.intermediate_size,
        vision.num_layers,
        vision.num_heads,
        vision.image_size,
        vision.patch_size,
    )
    vision_config = CLIPVisionConfig(
        **shape,
        projection_dim=768,
        hidden_act="quick_gelu",  # OpenAI CLIP's activation
    )
    text_config = LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=1e-5,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids["image"],
        image_seq_length=vision.num_tokens - 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=ids["pad"],
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = "sdpa"
    return config


def _qwen_arch_config(spec: QwenVLArchSpec, tokenizer=None):
    from .tiny_qwen import build_qwen_tokenizer, qwen_vl_config

    tokenizer = tokenizer or build_qwen_tokenizer()
    config = qwen_vl_config(spec.family, spec.vision, spec.text, tokenizer, vocab_size=spec.text.vocab_size)
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = "sdpa"
    return config


def _special_ids(tokenizer) -> dict[str, int]:
    if tokenizer is None:
        from .tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    return {
        "image": tokenizer.image_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }


def build_arch(
    spec: ArchSpec | QwenVLArchSpec | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Build ``spec`` with random weights on ``device``, plus the offline processor.

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode and a
        ``LlavaProcessor`` for 336 px images (576 placeholders per image); for a `QwenVLArchSpec`
        a ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` and the real
        processor class with the released pixel limits (`pitome_mllm.zoo.tiny_qwen`). For a spec with
        ``build_language_model=False`` the language model and LM head stay on ``meta``.

    Memory: parameters x bytes per value (`count_parameters` on the config gives the
    count): ``llava-1.5-7b`` ~7.1e9 (14 GB in fp16), ``clip-l-336+1b`` ~1.2e9 (4.8 GB in
    fp32), ``clip-l-336`` ~0.32e9, ``qwen2.5-vl-7b`` ~8.29e9 (``-vision``: 0.68e9, 2.7 GB in
    fp32), ``qwen3-vl-8b`` ~8.77e9 (``-vision``: 0.58e9).
    """
    from transformers import GenerationConfig

    spec = get_arch(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    processor = _arch_processor(spec)
    tokenizer = processor.tokenizer
    config = arch_config(spec, tokenizer)
    with torch.device("meta"):
        model = _arch_model_class(spec)._from_config(config, dtype=dtype)
    parts = _vision_parts(model)
    if spec.build_language_model:
        parts = [model]
    for part in parts:
        part.to_empty(device=device)
        _fill_random(part, seed)
    _recompute_buffers(model)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, processor


def _arch_processor(spec: ArchSpec | QwenVLArchSpec):
    if isinstance(spec, QwenVLArchSpec):
        from .tiny_qwen import REAL_QWEN_PIXELS, build_tiny_qwen_processor

        return build_tiny_qwen_processor(spec.family, REAL_QWEN_PIXELS[spec.family])
    from .tiny import build_tiny_processor

    return build_tiny_processor(spec.vision.image_size, spec.vision.patch_size)


def _arch_model_class(spec: ArchSpec | QwenVLArchSpec) -> type:
    if isinstance(spec, QwenVLArchSpec):
        from .tiny_qwen import qwen_vl_model_class

        return qwen_vl_model_class(spec.family)
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def _vision_parts(model: nn.Module) -> list[nn.Module]:
    """The modules that turn pixels into LLM tokens: the tower and projector (LLaVA), or the tower with its
    merger and DeepStack mergers inside (Qwen-VL's ``visual``)."""
    core = model.model
    if hasattr(core, "visual"):
        return [core.visual]
    return [core.vision_tower, core.multi_modal_projector]


def _noise_block(seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(_NOISE_BLOCK_LEN, generator=generator) * INIT_STD
    return block.to(device=device, dtype=dtype)


@torch.no_grad()
def _fill_tiled(tensor: torch.Tensor, block: torch.Tensor) -> None:
    """Copy ``block`` over ``tensor`` again and again (one broadcast copy, memory-bound)."""
    flat = tensor.view(-1)
    whole = flat.numel() // block.numel() * block.numel()
    if whole:
        flat[:whole].view(-1, block.numel()).copy_(block.expand(whole // block.numel(), -1))
    flat[whole:].copy_(block[: flat.numel() - whole])


@torch.no_grad()
def _fill_random(module: nn.Module, seed: int) -> None:
    """Norm weights 1, biases 0, everything else tiled N(0, 0.02) noise."""
    blocks: dict[tuple, torch.Tensor] = {}
    for owner in module.modules():
        is_norm = "Norm" in type(owner).__name__
        for name, param in owner.named_parameters(recurse=False):
            if is_norm and name == "weight":
                param.fill_(1.0)
            elif name == "bias":
                param.zero_()
            else:
                key = (param.device, param.dtype)
                if key not in blocks:
                    blocks[key] = _noise_block(seed, param.device, param.dtype)
                _fill_tiled(param, blocks[key])


@torch.no_grad()
def _recompute_buffers(model: nn.Module) -> None:
    """Position ids and rotary frequencies, by the owning sub-model's own initialiser.

    ``to_empty`` leaves buffers uninitialised; transformers' ``_init_weights`` knows how to
    compute the non-persistent ones. Only modules that own buffers are visited, and only
    materialised ones (buffers still on ``meta`` belong to parts that are never run).
    """
    from transformers import PreTrainedModel

    sub_models = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model]
    for sub_model in sub_models:
        for module in sub_model.modules():
            buffers = list(module.buffers(recurse=False))
            if buffers and all(buffer.device.type != "meta" for buffer in buffers):
                module._is_hf_initialized = False
                for buffer in buffers:
                    buffer.__dict__.pop("_is_hf_initialized", None)
                sub_model._init_weights(module)
                if transformers_version()[0] < 5:
                    _recompute_buffers_4x(module)


@torch.no_grad()
def _recompute_buffers_4x(module: nn.Module) -> None:
    """transformers 4.57's ``_init_weights`` leaves non-persistent buffers alone: recompute the kinds a LLaVA or
    Qwen-VL has (CLIP's position ids, the language models' rotary frequencies, the Qwen-VL towers' 2-D rotary
    frequencies); 5.x's ``_init_weights`` computes them."""
    position_ids = getattr(module, "position_ids", None)
    if isinstance(position_ids, torch.Tensor):
        position_ids.copy_(torch.arange(position_ids.shape[-1], device=position_ids.device).expand_as(position_ids))
    if not isinstance(getattr(module, "inv_freq", None), torch.Tensor):
        return
    rope_init_fn = getattr(module, "rope_init_fn", None)
    if rope_init_fn is not None:
        inv_freq, _ = rope_init_fn(module.config, module.inv_freq.device)
        module.inv_freq.copy_(inv_freq)
        module.original_inv_freq = module.inv_freq
    else:  # Qwen-VL's VisionRotaryEmbedding(dim, theta=10000): inv_freq has dim / 2 entries, no config
        fresh = type(module)(2 * module.inv_freq.numel())
        module.inv_freq.copy_(fresh.inv_freq)


def count_parameters(spec: ArchSpec | QwenVLArchSpec | str) -> dict[str, int]:
    """Parameter counts of ``spec`` by part, from a ``meta``-device build (no memory used).

    For Qwen-VL, ``projector`` counts the patch merger and the DeepStack mergers, ``vision_tower`` the rest of
    ``visual``."""
    spec = get_arch(spec) if isinstance(spec, str) else spec
    with torch.device("meta"):
        model = _arch_model_class(spec)._from_config(arch_config(spec))
    core = model.model

    def count(module: nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    if hasattr(core, "visual"):  # Qwen-VL: the merger (and DeepStack mergers) live inside the tower
        mergers = [core.visual.merger, *getattr(core.visual, "deepstack_merger_list", [])]
        projector = sum(count(merger) for merger in mergers)
        vision_tower = count(core.visual) - projector
    else:
        vision_tower, projector = count(core.vision_tower), count(core.multi_modal_projector)
    counts = {
        "vision_tower": vision_tower,
        "projector": projector,
        "language_model": count(core.language_model) + count(model.lm_head),
    }
    counts["total"] = sum(counts.values())
    return counts

"""A tiny random original-LLaVA model (``llava`` package), built and saved offline."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.llava_original import require_llava


def _tiny_llava_config(spec, tokenizer, tower_folder: Path):
    from llava.model.language_model.llava_llama import LlavaConfig

    from .tiny import tiny_llama_kwargs

    return LlavaConfig(
        **tiny_llama_kwargs(spec, tokenizer),
        # The multimodal fields a LLaVA-1.5 checkpoint's config.json carries.
        mm_vision_tower=str(tower_folder.resolve()),
        mm_hidden_size=spec.vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=spec.vision_feature_layer,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        tokenizer_padding_side="right",
    )


def _tiny_vision_tower(spec):
    from transformers import CLIPVisionModel

    from .tiny import tiny_clip_vision_config

    vision_config = tiny_clip_vision_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return CLIPVisionModel(vision_config)


def build_tiny_llava_original(folder: str | Path, spec=None, vision_tower: nn.Module | None = None):
    """A tiny random ``LlavaLlamaForCausalLM`` built offline, its tower saved under ``folder``.

    llava loads its CLIP tower and image processor by name, so they are written to
    ``folder / "vision_tower"`` and the config points there. Geometry and widths follow
    a `pitome_mllm.zoo.tiny.TinyLlavaSpec` (default ``TEST_SPEC``); ``vision_tower``
    reuses a given ``CLIPVisionModel`` (e.g. a transformers LLaVA's, to compare families).

    Returns:
        ``(model, tokenizer, image_processor)``, the model in eval mode, float32.
    """
    require_llava()
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import GenerationConfig

    from .tiny import TEST_SPEC, build_tiny_processor, build_tiny_tokenizer

    spec = spec or TEST_SPEC
    tower_folder = Path(folder) / "vision_tower"
    tower = vision_tower if vision_tower is not None else _tiny_vision_tower(spec)
    tower.save_pretrained(tower_folder)
    build_tiny_processor(spec.image_size, spec.patch_size).image_processor.save_pretrained(tower_folder)
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "right"  # llava pads right itself and reads this from its config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaLlamaForCausalLM(_tiny_llava_config(spec, tokenizer, tower_folder))
    model.get_vision_tower().load_model()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.float().eval(), tokenizer, model.get_vision_tower().image_processor


def save_tiny_llava_original(folder: str | Path, spec=None) -> Path:
    """Save a tiny model as an original-LLaVA checkpoint that ``load_pretrained_model`` loads offline.

    The folder name must contain ``llava`` for llava's builder to treat it as multimodal.
    Like real LLaVA-1.5 checkpoints, the weights leave out the CLIP tower, which is
    loaded from ``folder / "vision_tower"`` (the absolute path in ``config.json``).
    """
    folder = Path(folder)
    model, tokenizer, _ = build_tiny_llava_original(folder, spec)
    state = {name: value for name, value in model.state_dict().items() if ".vision_tower." not in name}
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    return folder


__all__ = ["build_tiny_llava_original", "save_tiny_llava_original"]

"""Which vision towers the CLIP-style adapter can merge in, and whether they carry a class token.

CLIP prepends a class token to its patch tokens; SigLIP has none (its optional
pooling head attends over all tokens instead). The merge schedule, the merge
steps and the placeholder count all depend on that difference, so adapters ask
`tower_has_class_token` once and pass the answer on. SigLIP's encoder layers and
attention (``self_attn.k_proj``, ``num_heads``) are laid out like CLIP's, so the
layer and key lookups of `pitome_mllm.models.clip_tower` serve both.
"""

from __future__ import annotations

from torch import nn

SUPPORTED_TOWERS = "CLIPVisionModel (class token) or SiglipVisionModel (no class token)"
# The same, by the tower config's model_type (for counting from a config, without a model).
CLASS_TOKEN_OF_TOWER = {"clip_vision_model": True, "siglip_vision_model": False}


def is_siglip_tower(vision_tower: nn.Module) -> bool:
    from transformers import SiglipVisionModel

    return isinstance(vision_tower, SiglipVisionModel)


def tower_has_class_token(vision_tower: nn.Module) -> bool:
    """True for a CLIP tower, False for a SigLIP tower.

    Raises:
        ValueError: any other tower; the message names the supported ones.
    """
    from transformers import CLIPVisionModel

    if isinstance(vision_tower, CLIPVisionModel):
        return True
    if is_siglip_tower(vision_tower):
        return False
    raise ValueError(f"unsupported vision tower {type(vision_tower).__name__}; supported: {SUPPORTED_TOWERS}")

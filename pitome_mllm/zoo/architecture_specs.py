"""The named real-size LLaVA shapes, as plain data (no torch: the command line lists them).

`pitome_mllm.zoo.architectures` builds models of these shapes with random weights.

>>> spec = ARCHITECTURES["llava-1.5-7b"]
>>> spec.text.hidden_size, spec.vision.num_layers
(4096, 24)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARCHITECTURES", "LLAVA_VOCAB_SIZE", "ArchSpec", "TextShape", "VisionShape", "get_arch"]

# Vocabulary of the llava-1.5 checkpoints: Llama-2's 32000 tokens plus added ones, padded to 32064.
LLAVA_VOCAB_SIZE = 32064


@dataclass(frozen=True)
class VisionShape:
    """A CLIP vision tower's shape (defaults: ViT-L/14 at 336 px, LLaVA-1.5's tower)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 336

    @property
    def num_tokens(self) -> int:
        """Tokens inside the tower: patches + CLS (577 for 336/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TextShape:
    """A Llama decoder's shape (defaults: Llama-2-7B / Vicuna-7B, LLaVA-1.5-7B's LLM)."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = LLAVA_VOCAB_SIZE
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ArchSpec:
    """A named LLaVA-1.5 style architecture.

    Attributes:
        name: the ``--arch`` name.
        description: one line for listings.
        vision: the CLIP tower's shape.
        text: the language model's shape (also fixes the projector's output width).
        build_language_model: False leaves the language model and LM head on the ``meta``
            device (vision tower + projector only); such a model cannot run ``forward``,
            only ``get_image_features``.
    """

    name: str
    description: str
    vision: VisionShape
    text: TextShape
    build_language_model: bool = True


LLAMA2_7B = TextShape()
LLAMA2_13B = TextShape(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824)
# A ~1B Llama (TinyLlama-like widths, grouped-query attention) that fits a CPU in fp32.
LLAMA_1B = TextShape(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, intermediate_size=5632)
CLIP_L_336 = VisionShape()

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llava-1.5-7b", "CLIP ViT-L/14-336 + Llama-2-7B shape (LLaVA-1.5-7B)", CLIP_L_336, LLAMA2_7B),
        ArchSpec("llava-1.5-13b", "CLIP ViT-L/14-336 + Llama-2-13B shape (LLaVA-1.5-13B)", CLIP_L_336, LLAMA2_13B),
        ArchSpec(
            "clip-l-336+1b", "CLIP ViT-L/14-336 + a ~1B Llama (hidden 2048, 16 layers, GQA 16/8)", CLIP_L_336, LLAMA_1B
        ),
        ArchSpec(
            "clip-l-336",
            "CLIP ViT-L/14-336 + LLaVA-1.5-7B projector only (no language model)",
            CLIP_L_336,
            LLAMA2_7B,
            build_language_model=False,
        ),
    )
}


def get_arch(name: str) -> ArchSpec:
    """The `ArchSpec` called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]

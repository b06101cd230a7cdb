"""The named real-size LLaVA shapes, as plain data (no torch: the command line lists them).

`pitome_mllm.zoo.architectures` builds models of these shapes with random weights.

>>> spec = ARCHITECTURES["llava-1.5-7b"]
>>> spec.text.hidden_size, spec.vision.num_layers
(4096, 24)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHITECTURES",
    "LLAVA_VOCAB_SIZE",
    "ArchSpec",
    "MemoryEstimate",
    "TextShape",
    "VisionShape",
    "estimate_memory",
    "get_arch",
    "parameter_count",
]

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


# ------------------------------------------------------------------------------ memory a run needs
def vision_parameters(vision: VisionShape) -> int:
    """Parameters of a CLIP vision tower: patch and position embeddings, layers, the two layer norms."""
    width, mlp = vision.hidden_size, vision.intermediate_size
    embeddings = 3 * vision.patch_size**2 * width + width + vision.num_tokens * width
    layer = 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width
    return embeddings + vision.num_layers * layer + 2 * 2 * width


def projector_parameters(vision: VisionShape, text: TextShape) -> int:
    """LLaVA-1.5's two-layer MLP projector."""
    return vision.hidden_size * text.hidden_size + text.hidden_size + text.hidden_size**2 + text.hidden_size


def text_parameters(text: TextShape) -> int:
    """Parameters of a Llama decoder with its embedding and (untied) LM head."""
    width, kv_width = text.hidden_size, text.num_kv_heads * text.head_dim
    layer = 2 * width * width + 2 * width * kv_width + 3 * width * text.intermediate_size + 2 * width
    return 2 * text.vocab_size * width + text.num_layers * layer + width


def parameter_count(spec: ArchSpec) -> int:
    """Parameters ``--arch`` builds (the language model only when ``spec.build_language_model``)."""
    count = vision_parameters(spec.vision) + projector_parameters(spec.vision, spec.text)
    return count + (text_parameters(spec.text) if spec.build_language_model else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a profiling run of an architecture needs: its weights, and the largest activations on top."""

    parameters: int
    weight_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def estimate_memory(spec: ArchSpec, dtype_bytes: int, batch_size: int = 1, text_tokens: int = 64) -> MemoryEstimate:
    """What an unpatched run of ``spec`` needs at most (merging only lowers it), before anything is built.

    Weights: parameters x ``dtype_bytes``. Activations: the largest working set of one step, which is
    the vision tower's attention scores ``[B, heads, N, N]`` with a few ``[B, N, mlp]`` buffers, or the
    language model's prefill over ``576 + text_tokens`` positions (attention scores, MLP buffers, the
    logits ``[B, L, vocab]`` in fp32, and the KV cache of every layer), plus a quarter for the allocator.
    """
    vision, text = spec.vision, spec.text
    tokens = vision.num_tokens
    vision_step = batch_size * (vision.num_heads * tokens * tokens + 4 * tokens * vision.intermediate_size)
    activation_elements = vision_step
    activation_bytes = activation_elements * dtype_bytes
    if spec.build_language_model:
        length = tokens - 1 + text_tokens
        prefill_step = batch_size * (text.num_heads * length * length + 4 * length * text.intermediate_size)
        kv_cache = 2 * text.num_layers * batch_size * length * text.num_kv_heads * text.head_dim
        logits_bytes = batch_size * length * text.vocab_size * 4
        activation_bytes = max(activation_bytes, (prefill_step + kv_cache) * dtype_bytes + logits_bytes)
    activation_bytes += activation_bytes // 4
    parameters = parameter_count(spec)
    return MemoryEstimate(parameters, parameters * dtype_bytes, activation_bytes)

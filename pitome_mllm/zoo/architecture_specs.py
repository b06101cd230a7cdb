"""The named real-size LLaVA and Qwen-VL shapes, as plain data (no torch: the command line lists them).

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
    "QwenTextShape",
    "QwenVLArchSpec",
    "QwenVisionShape",
    "REAL_QWEN_PIXELS",
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


@dataclass(frozen=True)
class QwenVisionShape:
    """A Qwen-VL vision tower's shape (defaults: Qwen2.5-VL-7B-Instruct's).

    Conv3d patches of ``temporal_patch_size x patch_size x patch_size`` px, 2-D rotary positions, no class token;
    the merger turns each ``spatial_merge_size``-square block of patches into one token of ``out_hidden_size``.
    Qwen2.5-VL: window attention (``window_size`` px) in every block but ``fullatt_block_indexes``. Qwen3-VL:
    learned positions (``num_position_embeddings``, a square grid) and DeepStack mergers after
    ``deepstack_visual_indexes``; ``window_size`` and ``fullatt_block_indexes`` are unused there.
    """

    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "silu"
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    deepstack_visual_indexes: tuple[int, ...] = ()
    num_position_embeddings: int = 2304


@dataclass(frozen=True)
class QwenTextShape:
    """A Qwen2 / Qwen3 decoder's shape with M-RoPE (defaults: Qwen2.5-VL-7B-Instruct's Qwen2-7B).

    ``mrope_section`` splits the rotary half-dimension (``head_dim // 2``) into (t, h, w) parts; Qwen3-VL
    interleaves them (``mrope_interleaved``).
    """

    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 152064
    head_dim: int = 128
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    mrope_interleaved: bool = False
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class QwenVLArchSpec:
    """A named Qwen-VL architecture (``family``: ``"qwen2.5-vl"`` or ``"qwen3-vl"``).

    ``build_language_model=False`` leaves the language model and LM head on ``meta`` (vision tower + merger only),
    as `ArchSpec` does.
    """

    name: str
    description: str
    family: str
    vision: QwenVisionShape
    text: QwenTextShape
    build_language_model: bool = True


# The released checkpoints' preprocessor limits (min_pixels, max_pixels) per family (Qwen2.5-VL-7B-Instruct;
# Qwen3-VL-8B-Instruct): ``smart_resize`` keeps an image's area between them.
REAL_QWEN_PIXELS = {"qwen2.5-vl": (56 * 56, 28 * 28 * 1280), "qwen3-vl": (65536, 16777216)}

# Qwen2.5-VL-7B-Instruct's config.json; the vision shape equals transformers' Qwen2_5_VLVisionConfig defaults
# except hidden_size (1280 in the checkpoint, 3584 in the class default).
QWEN25_VL_7B_VISION = QwenVisionShape()
QWEN25_VL_7B_TEXT = QwenTextShape()
# Qwen3-VL-8B-Instruct's config.json: the tower is transformers' Qwen3VLVisionConfig default (27 layers, 1152 wide,
# 16 px patches, 48 x 48 learned positions, DeepStack after layers 8, 16, 24) with out_hidden_size = the LLM's width;
# the LLM is Qwen3-8B's shape (36 layers, 4096 wide, GQA 32/8, head 128) with interleaved M-RoPE (24, 20, 20).
QWEN3_VL_8B_VISION = QwenVisionShape(
    hidden_size=1152,
    num_layers=27,
    num_heads=16,
    intermediate_size=4304,
    out_hidden_size=4096,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    fullatt_block_indexes=(),
    deepstack_visual_indexes=(8, 16, 24),
    num_position_embeddings=2304,
)
QWEN3_VL_8B_TEXT = QwenTextShape(
    hidden_size=4096,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=12288,
    vocab_size=151936,
    head_dim=128,
    mrope_section=(24, 20, 20),
    mrope_interleaved=True,
    rope_theta=5_000_000.0,
    max_position_embeddings=262144,
)

LLAMA2_7B = TextShape()
LLAMA2_13B = TextShape(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824)
# A ~1B Llama (TinyLlama-like widths, grouped-query attention) that fits a CPU in fp32.
LLAMA_1B = TextShape(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, intermediate_size=5632)
CLIP_L_336 = VisionShape()

ARCHITECTURES: dict[str, ArchSpec | QwenVLArchSpec] = {
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
        QwenVLArchSpec(
            "qwen2.5-vl-7b",
            "Qwen2.5-VL-7B shape (32-layer window-attention ViT/14 + Qwen2-7B, M-RoPE)",
            "qwen2.5-vl",
            QWEN25_VL_7B_VISION,
            QWEN25_VL_7B_TEXT,
        ),
        QwenVLArchSpec(
            "qwen2.5-vl-7b-vision",
            "Qwen2.5-VL-7B vision tower + patch merger only (no language model)",
            "qwen2.5-vl",
            QWEN25_VL_7B_VISION,
            QWEN25_VL_7B_TEXT,
            build_language_model=False,
        ),
        QwenVLArchSpec(
            "qwen3-vl-8b",
            "Qwen3-VL-8B shape (27-layer ViT/16 with DeepStack + Qwen3-8B, interleaved M-RoPE)",
            "qwen3-vl",
            QWEN3_VL_8B_VISION,
            QWEN3_VL_8B_TEXT,
        ),
        QwenVLArchSpec(
            "qwen3-vl-8b-vision",
            "Qwen3-VL-8B vision tower + patch merger and DeepStack mergers only (no language model)",
            "qwen3-vl",
            QWEN3_VL_8B_VISION,
            QWEN3_VL_8B_TEXT,
            build_language_model=False,
        ),
    )
}


def get_arch(name: str) -> ArchSpec | QwenVLArchSpec:
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


def qwen_vision_parameters(family: str, vision: QwenVisionShape, out_width: int) -> int:
    """A Qwen-VL tower's parameters with its patch merger (and Qwen3-VL's DeepStack mergers)."""
    width, mlp, merged = vision.hidden_size, vision.intermediate_size, 4 * vision.hidden_size
    qwen3 = family == "qwen3-vl"
    patch_embed = 3 * vision.temporal_patch_size * vision.patch_size**2 * width + (width if qwen3 else 0)
    # Qwen3-VL: LayerNorms (weight and bias), a plain two-layer MLP, learned positions; Qwen2.5-VL: RMSNorms and a
    # gated MLP.
    norms = 4 * width if qwen3 else 2 * width
    block_mlp = 2 * width * mlp + mlp + width if qwen3 else 3 * width * mlp + 2 * mlp + width
    block = norms + 4 * width * width + 4 * width + block_mlp
    merger_mlp = merged * merged + merged + merged * out_width + out_width
    merger = (2 * width if qwen3 else width) + merger_mlp
    deepstack = len(vision.deepstack_visual_indexes) * (2 * merged + merger_mlp)
    positions = vision.num_position_embeddings * width if qwen3 else 0
    return patch_embed + positions + vision.num_layers * block + merger + deepstack


def qwen_text_parameters(family: str, text: QwenTextShape) -> int:
    """A Qwen2 / Qwen3 decoder's parameters, embeddings and (untied) LM head included."""
    width, heads, kv_width = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    if family == "qwen3-vl":  # no projection biases; per-head query and key norms
        attention = 2 * width * heads + 2 * width * kv_width + 2 * text.head_dim
    else:  # Qwen2: biases on the query, key and value projections
        attention = 2 * width * heads + heads + 2 * (width * kv_width + kv_width)
    layer = attention + 3 * width * text.intermediate_size + 2 * width
    return 2 * text.vocab_size * width + text.num_layers * layer + width


def parameter_count(spec: ArchSpec | QwenVLArchSpec) -> int:
    """Parameters ``--arch`` builds (the language model only when ``spec.build_language_model``)."""
    if isinstance(spec, QwenVLArchSpec):
        count = qwen_vision_parameters(spec.family, spec.vision, spec.text.hidden_size)
        return count + (qwen_text_parameters(spec.family, spec.text) if spec.build_language_model else 0)
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
    if isinstance(spec, QwenVLArchSpec):
        # The patches of a 448 x 448 image (a Qwen-VL grid depends on the image); the LLM sees a quarter of them.
        tokens = (448 // vision.patch_size) ** 2
        visual_tokens = tokens // vision.spatial_merge_size**2
    else:
        tokens = vision.num_tokens
        visual_tokens = tokens - 1
    vision_step = batch_size * (vision.num_heads * tokens * tokens + 4 * tokens * vision.intermediate_size)
    activation_elements = vision_step
    activation_bytes = activation_elements * dtype_bytes
    if spec.build_language_model:
        length = visual_tokens + text_tokens
        prefill_step = batch_size * (text.num_heads * length * length + 4 * length * text.intermediate_size)
        kv_cache = 2 * text.num_layers * batch_size * length * text.num_kv_heads * text.head_dim
        logits_bytes = batch_size * length * text.vocab_size * 4
        activation_bytes = max(activation_bytes, (prefill_step + kv_cache) * dtype_bytes + logits_bytes)
    activation_bytes += activation_bytes // 4
    parameters = parameter_count(spec)
    return MemoryEstimate(parameters, parameters * dtype_bytes, activation_bytes)

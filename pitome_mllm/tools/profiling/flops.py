"""Analytic multiply-accumulate counts of a LLaVA forward, from the token counts that flow (FLOPs = 2 x MACs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ...models.protocol import DecoderShape

# Counts are multiply-accumulates (MACs) of the matrix products; FLOPs = 2 x MACs.
# Norms, activations, softmax, residual adds and gathers are left out: they are linear in
# the token count and a few percent of the total.


def vision_layer_macs(num_tokens: int, hidden: int, intermediate: int) -> int:
    """MACs of one ViT encoder layer on ``N`` tokens of width ``C`` with MLP width ``I``.

    ``4NC² + 2N²C + 2NCI``: Q, K, V and output projections (``4NC²``), attention scores
    ``QKᵀ`` and the weighted sum ``AV`` (``N²C`` each, summed over heads), and the two
    MLP matrices (``2NCI``). FLOPs are twice this.
    """
    n, c = num_tokens, hidden
    return 4 * n * c * c + 2 * n * n * c + 2 * n * c * intermediate


def patch_embedding_macs(num_patches: int, hidden: int, patch_size: int, channels: int = 3) -> int:
    """MACs of the patch-embedding convolution: ``patches x (channels x p²) x C``."""
    return num_patches * channels * patch_size * patch_size * hidden


def tome_macs(num_tokens: int, hidden: int) -> int:
    """Similarity MACs of one bipartite-matching step: ``ceil(N/2) x floor(N/2) x C``."""
    return math.ceil(num_tokens / 2) * (num_tokens // 2) * hidden


def pitome_macs(num_graph_tokens: int, r: int, hidden: int) -> int:
    """Similarity MACs of one PiToMe step on ``n`` graph tokens: ``n²C`` for the energy
    graph plus ``r²C`` for the A-to-B matching."""
    return (num_graph_tokens * num_graph_tokens + r * r) * hidden


def merge_macs(steps: Sequence, hidden: int, class_token: bool = True) -> int:
    """Similarity MACs of the tower's merge steps (`LayerStep` list)."""
    total = 0
    for step in steps:
        if step.method == "tome":
            total += tome_macs(step.tokens_in, hidden)
        elif step.method == "pitome":
            total += pitome_macs(step.tokens_in - (1 if class_token else 0), step.r, hidden)
    return total


def projector_merge_macs(num_tokens: int, target_tokens: int | None, width: int) -> int:
    """Similarity MACs of the projector-stage PiToMe steps from ``num_tokens`` down to
    ``target_tokens`` (each step removes at most half; no class token)."""
    total = 0
    while target_tokens is not None and num_tokens > target_tokens:
        r = min(num_tokens - target_tokens, num_tokens // 2)
        total += pitome_macs(num_tokens, r, width)
        num_tokens -= r
    return total


def projector_macs(num_tokens: int, vision_hidden: int, text_hidden: int) -> int:
    """MACs of LLaVA's two-layer MLP projector: ``N x (C_v x D + D x D)``."""
    return num_tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)


def patch_merger_macs(num_tokens: int, block_width: int, text_hidden: int) -> int:
    """MACs of a patch merger (Qwen-VL) making ``N`` tokens from blocks of ``block_width`` (``C x merge_size²``)
    features: its MLP ``N x (C_b x C_b + C_b x D)``."""
    return num_tokens * (block_width * block_width + block_width * text_hidden)


# `DecoderShape` field -> `LLMShape` field where they differ (profile reports keep the short names).
_DECODER_NAMES = {"hidden_size": "hidden", "intermediate_size": "intermediate"}


@dataclass(frozen=True)
class LLMShape:
    """What the FLOPs and KV-cache formulas need from a decoder config."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_decoder(cls, decoder: DecoderShape) -> LLMShape:
        """From the sizes a model's adapter reports (`ModelParts.decoder`)."""
        sizes = dataclasses.asdict(decoder)
        return cls(**{_DECODER_NAMES.get(name, name): value for name, value in sizes.items()})

    @classmethod
    def from_config(cls, text_config) -> LLMShape:
        """From a transformers decoder config."""
        return cls.from_decoder(DecoderShape.from_config(text_config))

    @property
    def projection_macs_per_token(self) -> int:
        """Q, K, V, O projections of one token in one layer: ``H x (2 x heads x d + 2 x kv x d)``."""
        return self.hidden * (2 * self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim)

    @property
    def mlp_macs_per_token(self) -> int:
        """Gated MLP (gate, up, down) of one token in one layer: ``3HI``."""
        return 3 * self.hidden * self.intermediate


def llm_prefill_macs(shape: LLMShape, seq_len: int, logits_tokens: int = 1) -> int:
    """MACs of a Llama prefill over ``S`` tokens (one sequence), logits for the last token.

    Per layer: ``S x (H(2·h·d + 2·kv·d) + 3HI) + 2 x S² x h·d``, i.e. projections and
    gated MLP, plus ``QKᵀ`` and ``AV`` over the full ``S x S`` score matrix (what the SDPA
    math and memory-efficient kernels compute; flash kernels skip the masked half).
    Plus the LM head on ``logits_tokens`` positions: ``H x V`` each.
    """
    per_layer = (
        seq_len * (shape.projection_macs_per_token + shape.mlp_macs_per_token)
        + 2 * seq_len * seq_len * shape.num_heads * shape.head_dim
    )
    return shape.num_layers * per_layer + logits_tokens * shape.hidden * shape.vocab_size


def llm_decode_macs(shape: LLMShape, context_len: int) -> int:
    """MACs of one cached decode step attending to ``T`` positions (the new one included).

    Per layer: ``H(2·h·d + 2·kv·d) + 3HI + 2 x T x h·d``; plus the LM head ``H x V``.
    """
    per_layer = (
        shape.projection_macs_per_token + shape.mlp_macs_per_token + 2 * context_len * shape.num_heads * shape.head_dim
    )
    return shape.num_layers * per_layer + shape.hidden * shape.vocab_size


def kv_cache_bytes_formula(shape: LLMShape, seq_len: int, batch_size: int, bytes_per_value: int) -> int:
    """``layers x 2 x kv_heads x head_dim x seq x batch x bytes``."""
    return shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * seq_len * batch_size * bytes_per_value

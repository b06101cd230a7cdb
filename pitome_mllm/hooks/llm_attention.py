"""Proportional attention inside the language model (``llm_prop_attn``).

After merging, a visual token the language model receives stands for ``size`` patches,
but softmax counts it once. Proportional attention (PiToMe / ToMe, paper section 3.2)
adds ``log(size)`` to the logit of every such key, so a key of size ``s`` weighs as ``s``
copies of itself: ``softmax(q.k + log s) ∝ s * exp(q.k)``.

Here that bias goes into the *additive attention mask* of every self-attention layer of
the language model, so the SDPA path (and its kernels) stays on and no attention map is
ever materialised. The pure functions below do the arithmetic; `LLMPropAttention` holds
the per-forward state and the hooks. Attribute paths (which module is the core, where the
attention layers are) are the adapters' business (``pitome_mllm/models/``).

Key positions are absolute positions in the key/value sequence (the prompt first, then
tokens decoded with a KV cache); only full-attention layers (key offset 0) are supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import Hook, remove_hooks, undone_on_error
from .state import PatchState

# ``(cache, layer_idx, q_length) -> (kv_length, kv_offset)``: the keys an attention call will see.
# How a cache answers differs between transformers releases; the adapter passes the answer in
# (`pitome_mllm.models.compat.cache_mask_sizes`), so nothing here depends on the release.
MaskSizes = Callable[[object, int, int], tuple[int, int]]

# --------------------------------------------------------------------------------------- pure functions


def visual_key_log_sizes(image_mask: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``log(size)`` at the image-token positions of each sequence, 0 elsewhere.

    LLaVA scatters the visual tokens of image ``i`` into the image-token positions in
    row-major order over the batch (``masked_scatter``), and ``sizes`` comes in that same
    image order, so a boolean-mask assignment lines them up.

    ``generate`` with ``num_beams`` / ``num_return_sequences`` repeats every prompt row
    ``e`` times (``repeat_interleave``) and every prompt's group of images ``e`` times, after
    the images were encoded once; that case is recognised by its ``e`` times as many
    image-token positions as sizes and handled as the un-repeated batch repeated.

    Args:
        image_mask: ``[B, L]`` bool, True where ``input_ids`` holds the image token.
        sizes: ``[num_images, K, 1]`` (or ``[num_images, K]``) patches held by each visual token.

    Returns:
        ``[B, L]`` float32.

    Raises:
        ValueError: the image-token positions do not match the number of visual tokens.
    """
    # Every LLM token holds at least one patch; the clamp only keeps log(0) out of the mask.
    log_sizes = sizes.reshape(-1).to(device=image_mask.device, dtype=torch.float32).clamp(min=1.0).log()
    num_positions = int(image_mask.sum())
    num_tokens = log_sizes.numel()
    if num_positions == num_tokens:
        bias = torch.zeros(image_mask.shape, dtype=torch.float32, device=image_mask.device)
        bias[image_mask] = log_sizes
        return bias
    repeats = num_positions // num_tokens if num_tokens else 0
    batch = image_mask.shape[0]
    if repeats > 1 and num_positions == repeats * num_tokens and batch % repeats == 0:
        prompts = image_mask[::repeats]
        if torch.equal(prompts.repeat_interleave(repeats, dim=0), image_mask):
            return visual_key_log_sizes(prompts, sizes).repeat_interleave(repeats, dim=0)
    raise ValueError(
        f"the prompts hold {num_positions} image-token positions, but the projector stage produced "
        f"{num_tokens} visual tokens ({tuple(sizes.shape[:2])} images x tokens); llm_prop_attn needs the "
        "image features of this forward's prompts"
    )


def extend_key_log_sizes(previous: torch.Tensor | None, past_length: int, current: torch.Tensor) -> torch.Tensor:
    """The key bias of a whole key/value sequence: what the cache holds, then this forward's tokens.

    Args:
        previous: ``[B, P]`` bias recorded for the cached keys (None: none recorded). Keys the
            record does not reach (decoded tokens) get 0; a record longer than ``past_length``
            (a cropped cache) is cut.
        past_length: keys already in the cache.
        current: ``[B, L]`` bias of this forward's tokens.

    Returns:
        ``[B, past_length + L]`` float32.
    """
    batch = current.shape[0]
    prefix = torch.zeros(batch, past_length, dtype=torch.float32, device=current.device)
    if previous is not None and past_length > 0:
        if previous.shape[0] != batch:
            raise ValueError(
                f"the cache holds keys of {previous.shape[0]} sequences, this forward has {batch}; "
                "llm_prop_attn cannot line up the visual keys"
            )
        kept = min(previous.shape[1], past_length)
        prefix[:, :kept] = previous[:, :kept].to(current.device)
    return torch.cat([prefix, current.float()], dim=1)


def key_bias_for(key_log_sizes: torch.Tensor, batch: int, kv_length: int) -> torch.Tensor:
    """Fit a recorded ``[B_rec, T]`` key bias to an attention call: ``[batch, kv_length]``.

    Keys past the record (decoded tokens) get 0. An attention batch that is a multiple of
    the recorded one (beam search expanding each row) repeats each row in place.
    """
    recorded, length = key_log_sizes.shape
    if length >= kv_length:
        bias = key_log_sizes[:, :kv_length]
    else:
        bias = torch.nn.functional.pad(key_log_sizes, (0, kv_length - length))
    if batch == recorded:
        return bias
    if recorded > 0 and batch % recorded == 0:
        return bias.repeat_interleave(batch // recorded, dim=0)
    raise ValueError(
        f"the attention batch ({batch}) is not a multiple of the batch whose visual tokens were recorded "
        f"({recorded}); llm_prop_attn cannot tell which keys are visual"
    )


def causal_additive_mask(q_length: int, kv_length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The float mask SDPA applies when transformers passes ``attention_mask=None``: ``[1, 1, q, kv]``.

    transformers (5.x ``sdpa_attention_forward``) turns a None mask into ``is_causal=True`` for
    ``q_length > 1`` and into no mask at all for ``q_length == 1``. ``is_causal`` is SDPA's
    upper-left causal mask (query ``i`` sees keys ``0..i``); transformers only skips the mask
    when that is right: no padding, and either ``q == kv`` or an empty cache (a static cache's
    prefill, whose keys past ``q`` are empty slots). A single query sees every key.
    """
    mask = torch.zeros(1, 1, q_length, kv_length, dtype=dtype, device=device)
    if q_length == 1:
        return mask
    query = torch.arange(q_length, device=device)[:, None]
    key = torch.arange(kv_length, device=device)[None, :]
    return mask.masked_fill(key > query, torch.finfo(dtype).min)


def additive_mask(
    attention_mask: torch.Tensor | None, q_length: int, kv_length: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """Any mask transformers hands an attention layer, as a float mask to add to the logits.

    Args:
        attention_mask: None (SDPA's causal fast path), a bool mask ``[B, 1, q, kv]`` (True:
            attend; SDPA) or a float mask (0 / ``finfo.min``; eager, or a user's 4D mask).
        dtype: the query dtype (SDPA needs a float mask of the query's dtype).

    Returns:
        ``[B or 1, 1, q, kv]`` of ``dtype`` (a float mask is returned as is).
    """
    if attention_mask is None:
        return causal_additive_mask(q_length, kv_length, dtype, device)
    if attention_mask.dtype == torch.bool:
        # What transformers' eager path uses for "masked": finfo.min, not -inf (no NaN rows).
        zeros = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return zeros.masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask


def add_key_bias(
    attention_mask: torch.Tensor | None, key_bias: torch.Tensor, q_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """``additive_mask(attention_mask) + key_bias`` on every query row: ``[B, 1, q, kv]``.

    Args:
        attention_mask: as in `additive_mask`.
        key_bias: ``[B, kv]`` (``log(size)`` at visual keys, 0 elsewhere).
        q_length: queries of the call.
        dtype: the query dtype (of a None or bool mask's result).

    A masked key stays masked: ``finfo.min + log(size)`` is still far below any logit.
    """
    kv_length = key_bias.shape[1]
    base = additive_mask(attention_mask, q_length, kv_length, dtype, key_bias.device)
    return base + key_bias[:, None, None, :].to(device=base.device, dtype=base.dtype)


def cached_length(cache) -> int:
    """Keys a transformers ``Cache`` already holds (0 for None or an empty one)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def call_kv_length(cache, layer_idx: int, q_length: int, mask_sizes: MaskSizes) -> int:
    """Keys an attention call will see, read from the cache (through ``mask_sizes``) before the layer updates it."""
    if cache is None:
        return q_length
    kv_length, kv_offset = mask_sizes(cache, layer_idx, q_length)
    if kv_offset:
        raise ValueError(
            f"layer {layer_idx} sees a sliding window of keys (offset {kv_offset}); llm_prop_attn supports "
            "full-attention layers only"
        )
    return int(kv_length)


# -------------------------------------------------------------------------------------------- hooks


@dataclass
class _PendingImages:
    """This forward has images; their key bias is built at the first attention layer (after the projector)."""

    image_mask: torch.Tensor  # [B, L]
    past_length: int
    sizes_before: torch.Tensor | None
    projector_runs: bool  # pixel_values given: the projector stage must record fresh sizes


class LLMPropAttention(Hook):
    """Forward pre-hooks that add ``log(size)`` at visual keys to every LLM self-attention's mask (a `Hook`).

    A pre-hook on the multimodal core model (the module that scatters image features into
    the image-token positions and calls the language model) reads ``input_ids`` and records
    where the image tokens are; a pre-hook on each self-attention module replaces its
    ``attention_mask`` keyword by ``additive mask + key bias``. Sizes are the patch state's
    ``final_size`` (``[num_images, K, 1]``, written by the projector stage), read at the
    first attention layer, after the projector has run.

    State: ``key_log_sizes`` (``[B, T]``, the bias of every key the cache holds plus this
    forward's, or None when no key needs one) survives the decode steps of one generation
    and is rebuilt by every forward with images or with an empty cache. The combined mask
    is computed once per forward and mask (the same tensor reaches every layer).

    Args:
        core: the module whose forward gets ``input_ids`` / ``pixel_values`` /
            ``mm_encoder_outputs`` / ``cache`` and runs the language model.
        attention_modules: the language model's self-attention modules, called with the
            keywords ``hidden_states``, ``attention_mask`` and ``cache``.
        image_token_id: the placeholder token of image features.
        state: the patch's `PatchState`, whose ``final_size`` the projector stage writes.
        mask_sizes: ``(cache, layer_idx, q_length) -> (kv_length, kv_offset)`` of the installed
            transformers release (`MaskSizes`), asked when a layer gets no mask.
    """

    def __init__(
        self,
        core: nn.Module,
        attention_modules: Sequence[nn.Module],
        image_token_id: int,
        state: PatchState,
        mask_sizes: MaskSizes,
    ) -> None:
        self.core = core
        self.mask_sizes = mask_sizes
        self.attention_modules = list(attention_modules)
        self.image_token_id = image_token_id
        self.state = state
        self.key_log_sizes: torch.Tensor | None = None
        self._pending: _PendingImages | None = None
        self._in_forward = False
        self._masks: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        with undone_on_error(self.remove):
            self._hooks.append(self.core.register_forward_pre_hook(self._on_core_input, with_kwargs=True))
            self._hooks.append(self.core.register_forward_hook(self._on_core_output, always_call=True))
            for module in self.attention_modules:
                self._hooks.append(module.register_forward_pre_hook(self._on_attention_input, with_kwargs=True))

    def remove(self) -> None:
        remove_hooks(self._hooks)
        self._reset()
        self.key_log_sizes = None

    def _reset(self) -> None:
        self._pending = None
        self._in_forward = False
        self._masks.clear()

    # ------------------------------------------------------------------------------------ core
    def _on_core_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._reset()
        self._in_forward = True
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        encoder_outputs = kwargs.get("mm_encoder_outputs") or {}
        past_length = cached_length(kwargs.get("cache", kwargs.get("past_key_values")))
        has_images = pixel_values is not None or encoder_outputs.get("image") is not None
        if not has_images:
            if past_length == 0:
                self.key_log_sizes = None  # a new sequence without images
            return  # else: a decode step; the cached keys keep their bias
        if input_ids is None:
            raise ValueError(
                "llm_prop_attn needs input_ids to find the image-token positions; this forward has images but "
                "only inputs_embeds"
            )
        self._pending = _PendingImages(
            image_mask=input_ids == self.image_token_id,
            past_length=past_length,
            sizes_before=self.state.final_size,
            projector_runs=pixel_values is not None,
        )

    def _on_core_output(self, module: nn.Module, args: tuple, output) -> None:
        self._reset()

    def _resolve_pending(self) -> None:
        pending, self._pending = self._pending, None
        sizes = self.state.final_size
        if sizes is None or (pending.projector_runs and sizes is pending.sizes_before):
            raise RuntimeError(
                "llm_prop_attn: the projector stage recorded no token sizes for this forward's images "
                "(was the projector called on the tower's output?)"
            )
        current = visual_key_log_sizes(pending.image_mask, sizes)
        previous = self.key_log_sizes if pending.past_length > 0 else None
        combined = extend_key_log_sizes(previous, pending.past_length, current)
        # Every token of size 1 (unmerged, random selection): nothing to add, the mask stays untouched.
        self.key_log_sizes = combined if bool(combined.any()) else None

    # ------------------------------------------------------------------------------- attention
    def _on_attention_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._in_forward:
            return None  # the language model called on its own: no image positions known
        if self._pending is not None:
            self._resolve_pending()
        if self.key_log_sizes is None:
            return None
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"llm_prop_attn expects {type(module).__name__} to get attention_mask as a keyword")
        attention_mask = kwargs["attention_mask"]
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
            raise RuntimeError(
                f"llm_prop_attn adds to 4D attention masks (sdpa, eager attention); got {type(attention_mask).__name__}"
                f"{'' if not isinstance(attention_mask, torch.Tensor) else f' of shape {tuple(attention_mask.shape)}'}"
            )
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        batch, q_length = hidden_states.shape[:2]
        if attention_mask is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            kv_length = call_kv_length(cache, getattr(module, "layer_idx", 0), q_length, self.mask_sizes)
        else:
            batch, kv_length = max(batch, attention_mask.shape[0]), attention_mask.shape[-1]
        key = (id(attention_mask), batch, q_length, kv_length)
        if key not in self._masks:
            key_bias = key_bias_for(self.key_log_sizes, batch, kv_length).to(hidden_states.device)
            dtype = hidden_states.dtype if attention_mask is None or attention_mask.dtype == torch.bool else None
            combined = add_key_bias(attention_mask, key_bias, q_length, dtype or attention_mask.dtype)
            # Holding the input mask keeps its id from being reused within this forward.
            self._masks[key] = (attention_mask, combined)
        return args, {**kwargs, "attention_mask": self._masks[key][1]}

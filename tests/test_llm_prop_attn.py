"""``llm_prop_attn``: log(size) of merged visual tokens added to the LLM's attention mask.

The mask arithmetic is checked on hand-computed tensors; on tiny random LLaVA models the
patched forward is compared with an independent oracle: the same merged model without the
option, given an explicit 4D float mask built here with plain loops (causal + padding +
``log(size)`` at visual keys). Exactness claims (keep_ratio=1, unpatch) use ``torch.equal``.
"""

from __future__ import annotations

import math

import pytest
import torch

import pitome_mllm
from pitome_mllm import PiToMeConfig
from pitome_mllm.hooks.llm_attention import (
    add_key_bias,
    additive_mask,
    causal_additive_mask,
    extend_key_log_sizes,
    key_bias_for,
    visual_key_log_sizes,
)
from pitome_mllm.models.llava_original import LlavaOriginalAdapter
from pitome_mllm.testing.llava import PROMPT, encode, logits_of

pytestmark = pytest.mark.model_facing

LONG_PROMPT = "USER: <image>\nDescribe the image in detail, please. ASSISTANT:"
TWO_IMAGES = "USER: <image> and <image>\nCompare them. ASSISTANT:"
MERGING = {"keep_ratio": 0.85}
MIN = torch.finfo(torch.float32).min


def greedy(model, inputs, max_new_tokens: int = 4, **kwargs):
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


# ------------------------------------------------------------------------------------- pure functions


def test_log_sizes_fill_image_positions_row_major_with_padding_and_several_images():
    # Row 0: left padded, one image of 2 tokens; row 1: two images of 2 tokens each.
    image_mask = torch.tensor(
        [
            [False, False, True, True, False, False],
            [True, True, False, True, True, False],
        ]
    )
    sizes = torch.tensor([[1.0, 2.0], [4.0, 1.0], [3.0, 5.0]]).unsqueeze(-1)  # [num_images, K, 1]
    expected = torch.tensor(
        [
            [0, 0, 0, math.log(2), 0, 0],
            [math.log(4), 0, 0, math.log(3), math.log(5), 0],
        ]
    )
    torch.testing.assert_close(visual_key_log_sizes(image_mask, sizes), expected)


def test_log_sizes_of_rows_repeated_by_generate():
    # generate(num_beams=2) repeats each prompt row in place after encoding the images once.
    prompts = torch.tensor([[True, True, False], [False, True, True]])
    sizes = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    expanded = visual_key_log_sizes(prompts.repeat_interleave(2, dim=0), sizes)
    torch.testing.assert_close(expanded, visual_key_log_sizes(prompts, sizes).repeat_interleave(2, dim=0))


def test_log_sizes_refuse_a_count_mismatch():
    with pytest.raises(ValueError, match="3 image-token positions"):
        visual_key_log_sizes(torch.tensor([[True, True, True]]), torch.ones(1, 2))


def test_extend_key_log_sizes_keeps_the_cached_part_and_zero_pads():
    current = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(extend_key_log_sizes(None, 2, current), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    previous = torch.tensor([[5.0, 6.0]])
    # The cache holds 3 keys, the record reaches 2 of them: the third (a decoded token) gets 0.
    torch.testing.assert_close(extend_key_log_sizes(previous, 3, current), torch.tensor([[5.0, 6.0, 0.0, 1.0, 0.0]]))
    # A cropped cache (1 key left) cuts the record.
    torch.testing.assert_close(extend_key_log_sizes(previous, 1, current), torch.tensor([[5.0, 1.0, 0.0]]))


def test_key_bias_for_pads_decoded_keys_cuts_and_repeats_beams():
    recorded = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    torch.testing.assert_close(key_bias_for(recorded, 2, 4), torch.tensor([[0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(key_bias_for(recorded, 2, 1), torch.tensor([[0.0], [3.0]]))
    torch.testing.assert_close(key_bias_for(recorded, 4, 2), recorded.repeat_interleave(2, dim=0))
    with pytest.raises(ValueError, match="attention batch \\(3\\)"):
        key_bias_for(recorded, 3, 2)


def test_causal_mask_of_a_none_mask_follows_sdpa_is_causal():
    square = causal_additive_mask(3, 3, torch.float32, "cpu")[0, 0]
    assert torch.equal(square == 0, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert square[0, 2] == MIN
    # One query (decoding, no padding): every key is visible.
    assert torch.equal(causal_additive_mask(1, 4, torch.float32, "cpu"), torch.zeros(1, 1, 1, 4))
    # Empty static cache: upper-left alignment, the empty slots past q stay masked.
    static = causal_additive_mask(2, 4, torch.float32, "cpu")[0, 0]
    assert torch.equal(static == 0, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool))


def test_add_key_bias_to_bool_none_and_float_masks():
    bias = torch.tensor([[0.0, math.log(3), 0.0]])
    allowed = torch.tensor([[[[False, True, False], [False, True, True]]]])  # key 0 is padding
    from_bool = add_key_bias(allowed, bias, 2, torch.float32)[0, 0]
    assert from_bool.shape == (2, 3) and from_bool.dtype == torch.float32
    assert from_bool[0, 0] == MIN and from_bool[0, 2] == MIN  # masked keys stay masked
    torch.testing.assert_close(from_bool[1, 1:], torch.tensor([math.log(3), 0.0]))

    from_none = add_key_bias(None, bias, 3, torch.float32)[0, 0]
    expected = causal_additive_mask(3, 3, torch.float32, "cpu")[0, 0] + bias
    assert torch.equal(from_none, expected)
    assert from_none[2, 1] == pytest.approx(math.log(3))

    float_mask = torch.tensor([[[[0.0, -1.0, MIN]]]])
    torch.testing.assert_close(add_key_bias(float_mask, bias, 1, torch.float32), float_mask + bias[:, None, None])
    assert additive_mask(float_mask, 1, 3, torch.float32, "cpu") is float_mask
    # bf16 masks come out in the query dtype, with bf16's own minimum.
    half = add_key_bias(allowed, bias, 2, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half[0, 0, 0, 0] == torch.finfo(torch.bfloat16).min


# --------------------------------------------------------------------------------------- tiny models


def explicit_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, sizes) -> torch.Tensor:
    """The oracle: ``[B, 1, L, L]`` float mask, causal + padding + log(size) at visual keys, by loops."""
    batch, length = input_ids.shape
    flat_sizes = iter(sizes.reshape(-1).tolist())
    key_bias = [[0.0] * length for _ in range(batch)]
    for row in range(batch):
        for position in range(length):
            if input_ids[row, position] == image_token_id:
                key_bias[row][position] = math.log(next(flat_sizes))
    mask = torch.full((batch, 1, length, length), MIN)
    for row in range(batch):
        for query in range(length):
            for key in range(query + 1):
                if attention_mask[row, key]:
                    mask[row, 0, query, key] = key_bias[row][key]
    return mask


def test_logits_equal_the_unpatched_lm_with_an_explicit_mask(tiny_llava, images):
    model, processor = tiny_llava
    image_token_id = model.config.image_token_id
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING) as handle:
        batch = encode(processor, [images["astronaut"], images["coffee"], images["chelsea"]], [PROMPT, TWO_IMAGES])
        assert batch["attention_mask"][0, 0] == 0, "the shorter prompt should be left padded"
        patched = logits_of(model, batch)
        sizes = handle.final_size
    assert sizes.shape == (3, handle.num_visual_tokens, 1) and sizes.max() > 1
    # Every patch is held by exactly one token.
    assert torch.equal(sizes.sum(dim=(1, 2)), torch.full((3,), 64.0))

    oracle_inputs = {
        **batch,
        "attention_mask": explicit_mask(batch["attention_mask"], batch["input_ids"], image_token_id, sizes),
    }
    with pitome_mllm.patched(model, processor, **MERGING):
        oracle = logits_of(model, oracle_inputs)
        without = logits_of(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(patched[real], oracle[real], rtol=1e-5, atol=1e-5)
    # The option does something: the same merge without it gives other logits.
    assert not torch.allclose(patched[real], without[real], rtol=1e-3, atol=1e-3)


def test_keep_ratio_one_is_bit_identical_to_the_unpatched_model(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, [images["astronaut"], images["coffee"]], [PROMPT, LONG_PROMPT])
    reference = logits_of(model, inputs)
    reference_tokens, _ = greedy(model, inputs)
    with pitome_mllm.patched(model, processor, keep_ratio=1.0, llm_prop_attn=True):
        assert torch.equal(logits_of(model, inputs), reference)
        assert torch.equal(greedy(model, inputs)[0], reference_tokens)


@pytest.mark.parametrize("generate_kwargs", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_generation_with_cache_equals_generation_without(tiny_llava, images, generate_kwargs):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING):
        inputs = encode(processor, [images["astronaut"], images["coffee"]], [PROMPT, LONG_PROMPT])
        with_cache, cached_scores = greedy(model, inputs, use_cache=True, **generate_kwargs)
        without_cache, uncached_scores = greedy(model, inputs, use_cache=False, **generate_kwargs)
    assert torch.equal(with_cache, without_cache)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)


def test_static_cache_generation_equals_dynamic_cache(tiny_llava, images):
    # An empty static cache's prefill reaches SDPA with attention_mask=None and more keys than queries.
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING):
        inputs = encode(processor, images["astronaut"], PROMPT)
        dynamic, dynamic_scores = greedy(model, inputs)
        static, static_scores = greedy(model, inputs, cache_implementation="static")
    assert torch.equal(dynamic, static)
    torch.testing.assert_close(dynamic_scores, static_scores, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_each_prompt_alone(tiny_llava, images):
    model, processor = tiny_llava
    batch_images = [images["astronaut"], images["coffee"]]
    prompts = [PROMPT, LONG_PROMPT]
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING):
        batch = encode(processor, batch_images, prompts)
        assert batch["attention_mask"][0, 0] == 0, "the shorter prompt should be left padded"
        batch_logits = logits_of(model, batch)[:, -1]
        for item, (image, prompt) in enumerate(zip(batch_images, prompts, strict=True)):
            alone_logits = logits_of(model, encode(processor, image, prompt))[:, -1]
            torch.testing.assert_close(alone_logits[0], batch_logits[item], rtol=1e-4, atol=1e-5)


def test_unpatch_restores_outputs_and_removes_every_hook(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, images["chelsea"], PROMPT)
    reference = logits_of(model, inputs)
    core = model.model
    attentions = [layer.self_attn for layer in core.language_model.layers]
    handle = pitome_mllm.patch(model, processor, llm_prop_attn=True, **MERGING)
    assert all(len(attention._forward_pre_hooks) == 1 for attention in attentions)
    logits_of(model, encode(processor, images["chelsea"], PROMPT))
    handle.unpatch()
    assert all(not attention._forward_pre_hooks for attention in attentions)
    assert not core._forward_pre_hooks and not core._forward_hooks
    assert torch.equal(logits_of(model, inputs), reference)


def test_text_only_forward_after_an_image_forward_is_untouched(tiny_llava, images):
    model, processor = tiny_llava
    text = processor.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt")
    reference = logits_of(model, dict(text))
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING):
        logits_of(model, encode(processor, images["chelsea"], PROMPT))
        assert torch.equal(logits_of(model, dict(text)), reference)


def test_eager_attention_gives_the_sdpa_logits(tiny_llava, images):
    # Eager attention gets a float mask (never None or bool): the other branch of the mask arithmetic.
    model, processor = tiny_llava
    text_config = model.model.language_model.config
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING):
        inputs = encode(processor, [images["astronaut"], images["coffee"]], [PROMPT, LONG_PROMPT])
        sdpa = logits_of(model, inputs)
        saved = text_config._attn_implementation
        text_config._attn_implementation = "eager"
        try:
            eager = logits_of(model, inputs)
        finally:
            text_config._attn_implementation = saved
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_with_images_is_refused(tiny_llava, images):
    model, processor = tiny_llava
    inputs = encode(processor, images["chelsea"], PROMPT)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pitome_mllm.patched(model, processor, llm_prop_attn=True, **MERGING):
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])


def test_attention_without_an_additive_mask_is_refused_at_patch_time(tiny_llava):
    model, processor = tiny_llava
    text_config = model.model.language_model.config
    saved = text_config._attn_implementation
    text_config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*sdpa, eager"):
            pitome_mllm.patch(model, processor, llm_prop_attn=True, **MERGING)
    finally:
        text_config._attn_implementation = saved
    assert pitome_mllm.get_patch(model) is None
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.language_model.layers)


def test_families_without_support_refuse_the_option():
    config = PiToMeConfig(keep_ratio=0.9, llm_prop_attn=True)
    with pytest.raises(ValueError, match="llava_original family; only llava_hf"):
        LlavaOriginalAdapter.check_supported(config)
    LlavaOriginalAdapter.check_supported(config.replace(llm_prop_attn=False))


def test_llava_next_refuses_the_option_before_touching_the_model():
    from pitome_mllm.zoo.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next()
    with pytest.raises(ValueError, match="llava_next family; only llava_hf"):
        pitome_mllm.patch(model, processor, target_tokens=16, llm_prop_attn=True)
    assert pitome_mllm.get_patch(model) is None

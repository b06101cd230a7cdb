"""The original LLaVA code (`llava` package): adapter, generate compatibility, loading, chat.

Tiny random models are built offline: a tiny CLIP tower and image processor are saved to a
temporary folder, the config points ``mm_vision_tower`` there, and llava loads it itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llava", reason="the original LLaVA code is not installed (pip install --no-deps llava-torch)")

import pitome_mllm  # noqa: E402
from pitome_mllm.assets import load_image  # noqa: E402
from pitome_mllm.models import find_adapter, llava_hf  # noqa: E402
from pitome_mllm.models import llava_original as original  # noqa: E402
from pitome_mllm.runtime import llava_original as original_runtime  # noqa: E402
from pitome_mllm.testing.llava import logits_of  # noqa: E402
from pitome_mllm.zoo import tiny_llava_original as original_tiny  # noqa: E402
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava  # noqa: E402

# llava-torch passes past_key_values to LlamaForCausalLM, which transformers 5.x renamed.
pytestmark = [pytest.mark.model_facing, pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")]

IMAGE_TOKEN_INDEX = -200
QUESTION = "What is in the image?"
MERGING_CONFIGS = [
    pytest.param({"keep_ratio": 0.9}, id="pitome-0.9"),
    pytest.param({"method": "tome", "keep_ratio": 0.9}, id="tome-0.9"),
    pytest.param({"target_tokens": 20, "keep_order": True}, id="budget-20-ordered"),
    pytest.param({"preset": "pure", "keep_ratio": 0.9}, id="pure-0.9"),
]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model, tokenizer, image_processor)``: a tiny `LlavaLlamaForCausalLM` (6 CLIP layers, 112 px)."""
    return original_tiny.build_tiny_llava_original(tmp_path_factory.mktemp("tiny_llava_original"))


@pytest.fixture(scope="module")
def inputs(tiny):
    """Two prompts (different lengths) with one image each, right-padded as llava expects."""
    model, tokenizer, image_processor = tiny
    prompts = [
        original_runtime.build_prompt([(QUESTION, None)]),
        original_runtime.build_prompt([("Describe it.", None)]),
    ]
    ids = [original_runtime.tokenize_prompt(prompt, tokenizer) for prompt in prompts]
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id)
    attention_mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(row) for row in ids], batch_first=True, padding_value=0
    )
    images = original_runtime.prepare_images([load_image("chelsea"), load_image("astronaut")], image_processor, model)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "images": images}


def _capture_llm_lengths(model):
    """Record the length of every sequence the language model receives (after splicing)."""
    lengths: list[int] = []

    def record(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        lengths.append(embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1])

    return lengths, model.get_model().register_forward_pre_hook(record, with_kwargs=True)


def _capture_output(module):
    captured: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda mod, args, output: captured.append(output))
    return captured, hook


def _forward_state(model, adapter_layers, projector) -> dict:
    """What patching may change: instance forwards and hook dictionaries."""
    return {
        "model_forward": model.__dict__.get("forward"),
        "layer_forwards": [layer.__dict__.get("forward") for layer in adapter_layers],
        "projector_hooks": dict(projector._forward_hooks),
    }


# ------------------------------------------------------------------------------- registry
def test_registry_picks_the_original_adapter_only_for_llava_models(tiny):
    model = tiny[0]
    assert find_adapter(model) is original.LlavaOriginalAdapter
    assert not llava_hf.matches(model)
    hf_model, _ = build_tiny_llava(TEST_SPEC)
    assert not original.matches(hf_model)
    assert "original LLaVA" in original.SUPPORTED


def test_processor_is_ignored_and_visual_tokens_are_planned(tiny):
    model, _, image_processor = tiny
    with pitome_mllm.patched(model, image_processor, keep_ratio=0.9) as handle:
        assert handle.family == "llava_original"
        assert handle.num_visual_tokens == handle.schedule[-1].tokens_out - 1  # class token dropped
        assert handle.num_visual_tokens < TEST_SPEC.num_patches


# -------------------------------------------------------------------------------- exactness
def test_keep_ratio_one_is_bit_identical(tiny, inputs):
    model = tiny[0]
    reference = logits_of(model, inputs)
    with pitome_mllm.patched(model, None, keep_ratio=1.0) as handle:
        assert handle.num_visual_tokens == TEST_SPEC.num_patches
        assert torch.equal(logits_of(model, inputs), reference)


@pytest.mark.parametrize("config", MERGING_CONFIGS)
def test_planned_token_count_reaches_the_language_model(tiny, inputs, config):
    model = tiny[0]
    text_lengths = inputs["attention_mask"].sum(dim=1) - 1  # the image marker is replaced
    with pitome_mllm.patched(model, None, **config) as handle:
        lengths, hook = _capture_llm_lengths(model)
        projected, projector_hook = _capture_output(model.get_model().mm_projector)
        try:
            logits_of(model, inputs)
        finally:
            hook.remove()
            projector_hook.remove()
        if "target_tokens" in config:
            assert handle.num_visual_tokens == config["target_tokens"]
        assert projected[-1].shape[:2] == (2, handle.num_visual_tokens)
        # llava pads the spliced sequences to the longest one.
        assert lengths == [int(text_lengths.max()) + handle.num_visual_tokens]


# ------------------------------------------------------------------- selected hidden state
def _check_selected_state_is_merged(model, images) -> None:
    """The tower wrapper's features are the merged output of the layer it selects."""
    handle = pitome_mllm.get_patch(model)
    adapter = handle._adapter
    selected_outputs, hook = _capture_output(adapter.layers[adapter.last_layer])
    try:
        with torch.no_grad():
            features = model.get_vision_tower()(images)
    finally:
        hook.remove()
    merged = selected_outputs[-1]
    merged = merged[0] if isinstance(merged, tuple) else merged
    assert features.shape[1] == handle.num_visual_tokens
    assert torch.equal(features, merged[:, int(adapter.drops_class_token) :])


def test_selected_state_is_merged_when_patched_after_a_forward(tiny, inputs):
    model = tiny[0]
    logits_of(model, inputs)  # transformers installs its hidden-state recorders on this first run
    with pitome_mllm.patched(model, None, keep_ratio=0.9):
        _check_selected_state_is_merged(model, inputs["images"])


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_selected_state_is_merged_when_patched_before_any_forward(tmp_path, inputs, select_feature):
    model, _, _ = original_tiny.build_tiny_llava_original(tmp_path)
    model.get_vision_tower().select_feature = select_feature
    model.config.mm_vision_select_feature = select_feature
    with pitome_mllm.patched(model, None, keep_ratio=0.9) as handle:
        assert handle._adapter.drops_class_token == (select_feature == "patch")
        _check_selected_state_is_merged(model, inputs["images"])


# -------------------------------------------------------------------------------- generate
def _greedy_reference(model, input_ids, images, max_new_tokens, eos_token_id) -> list[int]:
    """Greedy decoding by full forwards (no cache): what cached generation must reproduce."""
    generated: list[int] = []
    for _ in range(max_new_tokens):
        sequence = torch.cat([input_ids, torch.tensor([generated], dtype=input_ids.dtype)], dim=1)
        with torch.no_grad():
            next_token = int(model(input_ids=sequence, images=images).logits[0, -1].argmax())
        generated.append(next_token)
        if next_token == eos_token_id:
            break
    return generated


def test_cached_generate_equals_uncached_greedy_decoding(tiny, inputs):
    model, tokenizer, _ = tiny
    input_ids = inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())]
    images = inputs["images"][:1]
    with pitome_mllm.patched(model, None, keep_ratio=0.9):
        with torch.no_grad():
            cached = model.generate(input_ids, images=images, max_new_tokens=6, do_sample=False)
            uncached = model.generate(input_ids, images=images, max_new_tokens=6, do_sample=False, use_cache=False)
        reference = _greedy_reference(model, input_ids, images, 6, tokenizer.eos_token_id)
    # Generating from embeddings, llava returns only the new tokens.
    assert len(reference) > 1 and cached[0].tolist() == reference
    assert torch.equal(cached, uncached)


def test_generate_needs_the_compat_wrapper_on_this_transformers(tiny, inputs):
    model = tiny[0]
    if not original.needs_generate_compat(model):
        pytest.skip("this transformers passes no keywords the llava forward rejects")
    input_ids = inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())]
    with pytest.raises(TypeError, match="cache"):
        model.generate(input_ids, images=inputs["images"][:1], max_new_tokens=2)


def test_enable_generate_compat_standalone_and_alongside_a_patch(tiny, inputs):
    model = tiny[0]
    input_ids = inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())]
    images = inputs["images"][:1]
    with original.enable_generate_compat(model) as compat:
        assert original.has_generate_compat(model) == original.needs_generate_compat(model)
        unpatched = model.generate(input_ids, images=images, max_new_tokens=4)
        # A patch reuses the user's wrapper and leaves it in place when removed.
        with pitome_mllm.patched(model, None, keep_ratio=1.0):
            assert torch.equal(model.generate(input_ids, images=images, max_new_tokens=4), unpatched)
        assert original.has_generate_compat(model) == compat.installed
    assert "forward" not in model.__dict__


def test_generate_gives_no_past_key_values_warning_patched_or_not(tiny, inputs):
    """llava hands past_key_values=None on beside transformers 5.x's cache; the compat handle
    calls through without it, so transformers has nothing to warn about on each turn."""
    import warnings

    model = tiny[0]
    input_ids = inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())]
    images = inputs["images"][:1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with original.enable_generate_compat(model) as compat:
            assert compat.quiet_prepare == original.needs_quiet_prepare(model)
            unpatched = model.generate(input_ids, images=images, max_new_tokens=3, do_sample=False)
        with pitome_mllm.patched(model, None, keep_ratio=1.0):
            patched = model.generate(input_ids, images=images, max_new_tokens=3, do_sample=False)
    assert torch.equal(unpatched, patched)
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert "prepare_inputs_for_generation" not in model.__dict__ and "forward" not in model.__dict__


def test_mistral_variant_is_exact_at_keep_ratio_one_and_generates_merged(tiny, inputs):
    from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

    # The Llama model's config, as a Mistral one: same widths, same tower folder.
    values = {
        key: value for key, value in tiny[0].config.to_dict().items() if key not in ("model_type", "architectures")
    }
    model = LlavaMistralForCausalLM(LlavaMistralConfig(**values, sliding_window=None))
    model.get_vision_tower().load_model()
    model.eval()
    input_ids = inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())]
    images = inputs["images"][:1]
    reference = logits_of(model, {"input_ids": input_ids, "images": images})
    with pitome_mllm.patched(model, None, keep_ratio=1.0):
        assert torch.equal(logits_of(model, {"input_ids": input_ids, "images": images}), reference)
    with pitome_mllm.patched(model, None, target_tokens=20) as handle:
        assert handle.num_visual_tokens == 20
        cached = model.generate(input_ids, images=images, max_new_tokens=4, do_sample=False)
        uncached = model.generate(input_ids, images=images, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert "forward" not in model.__dict__


# ---------------------------------------------------------------------------------- unpatch
def test_unpatch_restores_forwards_and_outputs(tiny, inputs):
    model = tiny[0]
    reference = logits_of(model, inputs)
    adapter = original.LlavaOriginalAdapter(model, None, pitome_mllm.PiToMeConfig(keep_ratio=0.9))
    projector = model.get_model().mm_projector
    before = _forward_state(model, adapter.layers, projector)
    handle = pitome_mllm.patch(model, None, keep_ratio=0.9, target_tokens=24)
    assert original.has_generate_compat(model) == original.needs_generate_compat(model)
    assert not torch.equal(logits_of(model, inputs)[:, -1], reference[:, -1])
    handle.unpatch()
    assert _forward_state(model, adapter.layers, projector) == before
    assert torch.equal(logits_of(model, inputs), reference)


# ------------------------------------------------------------------------------- rejection
@pytest.mark.parametrize("merge_type", ["spatial", "spatial_unpad"])
def test_rejects_spatial_patch_merge_types(tiny, merge_type):
    model = tiny[0]
    model.config.mm_patch_merge_type = merge_type
    try:
        with pytest.raises(ValueError, match="supported: flat"):
            pitome_mllm.patch(model, None, keep_ratio=0.9)
    finally:
        model.config.mm_patch_merge_type = "flat"
    assert pitome_mllm.get_patch(model) is None
    assert "forward" not in model.__dict__


# ------------------------------------------------------------------------- across families
def _tie_to_transformers_llava(tmp_path):
    """A transformers LLaVA and an original LLaVA sharing the same CLIP tower and projector weights."""
    hf_model, processor = build_tiny_llava(TEST_SPEC)
    model, _, _ = original_tiny.build_tiny_llava_original(tmp_path, TEST_SPEC, vision_tower=hf_model.model.vision_tower)
    hf_projector = hf_model.model.multi_modal_projector
    projector = model.get_model().mm_projector  # mlp2x_gelu: Linear, GELU, Linear
    projector[0].load_state_dict(hf_projector.linear_1.state_dict())
    projector[2].load_state_dict(hf_projector.linear_2.state_dict())
    return hf_model, processor, model


def _merged_visual_tokens(llava, processor, projector, config, run) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projector output, final token map)`` of one forward (``run()``) under ``config``."""
    with pitome_mllm.patched(llava, processor, **config) as handle:
        projected, hook = _capture_output(projector)
        try:
            with torch.no_grad():
                run()
        finally:
            hook.remove()
        return projected[-1], handle.final_token_map.clone()


@pytest.mark.parametrize("config", MERGING_CONFIGS[:3] + [pytest.param({"keep_ratio": 1.0}, id="exact")])
def test_same_merged_visual_tokens_in_both_families(tmp_path, config):
    hf_model, processor, model = _tie_to_transformers_llava(tmp_path)
    image = load_image("coffee")
    # The transformers processor's pixel values go to both, so both towers see the same input.
    with pitome_mllm.patched(hf_model, processor, **config):
        hf_inputs = processor(images=image, text=f"USER: <image>\n{QUESTION} ASSISTANT:", return_tensors="pt")
    ids = original_runtime.tokenize_prompt(original_runtime.build_prompt([(QUESTION, None)]), processor.tokenizer)[None]

    hf_tokens, hf_map = _merged_visual_tokens(
        hf_model, processor, hf_model.model.multi_modal_projector, config, lambda: hf_model(**hf_inputs)
    )
    tokens, token_map = _merged_visual_tokens(
        model,
        None,
        model.get_model().mm_projector,
        config,
        lambda: model(input_ids=ids, images=hf_inputs["pixel_values"]),
    )
    assert torch.equal(token_map, hf_map)  # the same patches merged into the same tokens
    torch.testing.assert_close(tokens, hf_tokens, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    return original_tiny.save_tiny_llava_original(tmp_path_factory.mktemp("ckpt") / "tiny-llava-original")


def test_checkpoint_loads_through_llava_builder_and_generates_patched(saved_checkpoint):
    tokenizer, model, image_processor, context_len = original_runtime.load_llava_original(
        saved_checkpoint, device="cpu"
    )
    assert model.dtype == torch.float32 and model.get_vision_tower().dtype == torch.float32
    ids = original_runtime.tokenize_prompt(original_runtime.build_prompt([(QUESTION, None)]), tokenizer)[None]
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    images = original_runtime.prepare_images([load_image("coffee")], image_processor, model)
    with pitome_mllm.patched(model, image_processor, target_tokens=16):
        output = model.generate(ids, images=images, max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 3)


def test_loader_needs_llava_in_the_model_name(saved_checkpoint):
    with pytest.raises(ValueError, match="model_name"):
        original_runtime.load_llava_original(saved_checkpoint, model_name="tiny", device="cpu")


def test_build_prompt_uses_the_llava_template():
    prompt = original_runtime.build_prompt([(QUESTION, "A cat."), ("What colour?", None)])
    assert prompt.count("<image>") == 1 and prompt.index("<image>") < prompt.index(QUESTION)
    assert prompt.endswith("USER: What colour? ASSISTANT:")
    with pytest.raises(ValueError, match="conv_template"):
        original_runtime.build_prompt([(QUESTION, None)], conv_template="nope")


# ------------------------------------------------------------------------------------- chat
def test_chat_llava_answers_one_prompt_with_the_merged_token_count(saved_checkpoint, capsys):
    from pitome_mllm.cli import main

    argv = ["chat-llava", "--model", str(saved_checkpoint), "--image", "coffee", "--prompt", QUESTION]
    assert main([*argv, "--target-tokens", "16", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "llava_original" in captured.err and "[16 visual tokens" in captured.out


def test_chat_llava_unpatched_conversation_until_exit(monkeypatch, capsys):
    import io

    from pitome_mllm.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\nexit\nnot asked\n"))
    assert main(["chat-llava", "--model", "tiny-test", "--image", "astronaut", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(f"[{TEST_SPEC.num_patches} visual tokens" in line for line in lines) == 2


@pytest.mark.parametrize(
    "extra, message",
    [(["--conv-mode", "nope"], "conv-mode"), (["--keep-ratio", "0.3"], "0.3")],
)
def test_chat_llava_reports_bad_arguments_in_one_line(extra, message, capsys):
    from pitome_mllm.cli import main

    argv = ["chat-llava", "--model", "tiny-test", "--image", "astronaut", "--prompt", "q", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------- lmms-eval
@pytest.fixture(scope="module")
def lmms_model(saved_checkpoint):
    """``pitome_llava`` on the saved tiny checkpoint, patched to 16 visual tokens, batch size 2."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'pitome-mllm[eval]')")
    from pitome_mllm.integrations.lmms_eval.llava_original import PiToMeLlava

    model = PiToMeLlava(
        pretrained=str(saved_checkpoint), device="cpu", batch_size="2", target_tokens="16", keep_order="true"
    )
    docs = {0: load_image("coffee"), 1: load_image("chelsea"), 2: load_image("astronaut")}
    model.task_dict = {"tiny_task": {"test": docs}}
    return model


def _request(request_type: str, doc_id: int, *arguments):
    from lmms_eval.api.instance import Instance

    metadata = {"task": "tiny_task", "doc_id": doc_id, "repeats": 1}
    return Instance(request_type=request_type, arguments=arguments, idx=doc_id, metadata=metadata)


def test_lmms_eval_manifest_names_the_model_class():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'pitome-mllm[eval]')")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from pitome_mllm.integrations.lmms_eval import llava_original as plugin
    from pitome_mllm.lmms_eval_manifest import manifest_llava_original

    registry = ModelRegistryV2()
    registry.register_manifest(manifest_llava_original())
    # Resolving imports the class and checks it is a simple lmms model.
    assert registry.get_model_class("pitome_llava") is plugin.PiToMeLlava


def test_lmms_eval_generate_until_batches_and_reports_merged_tokens(lmms_model):
    def visual(doc):
        return [doc]

    requests = [
        _request(
            "generate_until",
            doc_id,
            question,
            {"max_new_tokens": 3, "until": ["\n"]},
            visual,
            doc_id,
            "tiny_task",
            "test",
        )
        for doc_id, question in enumerate([QUESTION, "Describe the picture in detail, please.", "Colour?"])
    ]
    results = lmms_model.generate_until(requests)
    assert len(results) == 3 and all(isinstance(result.text, str) for result in results)
    costs = [result.token_counts for result in results]
    assert [cost.visual_tokens for cost in costs] == [16, 16, 16]
    assert sorted(cost.batch_size for cost in costs) == [1, 2, 2]
    assert all(1 <= cost.output_tokens <= 3 for cost in costs)
    # Batched rows (the shorter one left-padded) decode like the same requests alone.
    assert [lmms_model.generate_until([request])[0].text for request in requests[:2]] == [
        result.text for result in results[:2]
    ]
    assert lmms_model.run_summary()["mean_visual_tokens"] == 16


def test_lmms_eval_loglikelihood_scores_the_continuation(lmms_model):
    def visual(doc):
        return [doc]

    requests = [_request("loglikelihood", 0, QUESTION, " A cup.", visual, 0, "tiny_task", "test")]
    (result,) = lmms_model.loglikelihood(requests)
    loss, is_greedy = result.text
    assert loss > 0 and isinstance(is_greedy, bool)
    assert result.token_counts.visual_tokens == 16

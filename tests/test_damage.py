"""Nothing is modified behind the user's back: a processor shared by two models, copies and pickles of a
patched processor (LLaVA-1.5 and LLaVA-NeXT)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import pitome_mllm
from pitome_mllm.testing.llava import encode, logits_of, pitome_leftovers, placeholder_counts
from pitome_mllm.zoo.tiny import TEST_SPEC, TinyLlavaSpec, build_tiny_llava, build_tiny_llava_next

pytestmark = pytest.mark.model_facing

NEXT_SPEC = TinyLlavaSpec(image_size=224, patch_size=14, vision_layers=6)
BUILDERS = {"llava-1.5": lambda: build_tiny_llava(TEST_SPEC), "llava-next": lambda: build_tiny_llava_next(NEXT_SPEC)}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def two_models(request):
    """``(model_a, model_b, processor)``: two models of one family and one processor for both."""
    model_a, processor = BUILDERS[request.param]()
    model_b, _ = BUILDERS[request.param]()
    return model_a, model_b, processor


@pytest.fixture
def pristine(two_models, images):
    """What the unpatched processor emits and each unpatched model computes from it."""
    model_a, model_b, processor = two_models
    inputs = encode(processor, [images["astronaut"]])
    return {
        "counts": placeholder_counts(processor, inputs),
        "input_ids": inputs["input_ids"],
        "logits": [logits_of(model_a, inputs), logits_of(model_b, inputs)],
        "processor_dict": dict(processor.__dict__),
    }


def check_pristine(models, processor, pristine, images) -> None:
    inputs = encode(processor, [images["astronaut"]])
    assert torch.equal(inputs["input_ids"], pristine["input_ids"])
    assert processor.__dict__ == pristine["processor_dict"]
    for model, logits in zip(models, pristine["logits"], strict=True):
        assert pitome_leftovers(model) == []
        assert torch.equal(logits_of(model, inputs), logits)


def runs_patched(model, handle, processor, images) -> None:
    """The processor emits the handle's count and the patched model accepts its prompt."""
    inputs = encode(processor, [images["astronaut"]])
    assert placeholder_counts(processor, inputs) == [handle.visual_tokens_for_image(*images["astronaut"].size[::-1])]
    assert torch.isfinite(logits_of(model, inputs)).all()


def test_a_processor_patched_for_one_model_is_refused_for_another(two_models, pristine, images):
    model_a, model_b, processor = two_models
    handle_a = pitome_mllm.patch(model_a, processor, keep_ratio=0.9)
    try:
        with pytest.raises(RuntimeError, match=r"already patched for another model.*unpatch.*its own processor"):
            pitome_mllm.patch(model_b, processor, keep_ratio=0.95)
        # The refusal left model B unpatched and the processor counting for model A.
        assert pitome_mllm.get_patch(model_b) is None and pitome_leftovers(model_b) == []
        runs_patched(model_a, handle_a, processor, images)
    finally:
        handle_a.unpatch()
    check_pristine([model_a, model_b], processor, pristine, images)
    # Once model A let go of it, the processor serves model B.
    with pitome_mllm.patched(model_b, processor, keep_ratio=0.95) as handle_b:
        runs_patched(model_b, handle_b, processor, images)
    check_pristine([model_a, model_b], processor, pristine, images)


@pytest.mark.parametrize("first_unpatched", [0, 1])
def test_two_models_with_their_own_processors_unpatch_in_any_order(two_models, pristine, images, first_unpatched):
    model_a, model_b, processor = two_models
    processor_b = copy.deepcopy(processor)  # the remedy the refusal names: a copy made before patching
    handles = [
        pitome_mllm.patch(model_a, processor, keep_ratio=0.9),
        pitome_mllm.patch(model_b, processor_b, keep_ratio=0.95),
    ]
    pairs = [(model_a, processor), (model_b, processor_b)]
    try:
        assert handles[0].num_visual_tokens != handles[1].num_visual_tokens
        handles[first_unpatched].unpatch()
        still = 1 - first_unpatched
        runs_patched(*pairs[still][:1], handles[still], pairs[still][1], images)
        unpatched_model, unpatched_processor = pairs[first_unpatched]
        inputs = encode(unpatched_processor, [images["astronaut"]])
        assert placeholder_counts(unpatched_processor, inputs) == pristine["counts"]
        assert torch.equal(logits_of(unpatched_model, inputs), pristine["logits"][first_unpatched])
    finally:
        for handle in handles:
            handle.unpatch()
    check_pristine([model_a, model_b], processor, pristine, images)
    assert placeholder_counts(processor_b, encode(processor_b, [images["astronaut"]])) == pristine["counts"]


def test_copying_or_pickling_a_patched_processor_is_refused_with_a_remedy(two_models, pristine, images):
    model_a, model_b, processor = two_models
    with pitome_mllm.patched(model_a, processor, keep_ratio=0.9) as handle:
        with pytest.raises(TypeError, match=r"processor patched by pitome_mllm cannot be copied or pickled.*unpatch"):
            copy.deepcopy(processor)
        with pytest.raises(TypeError, match=r"processor patched by pitome_mllm cannot be copied or pickled.*unpatch"):
            pickle.dumps(processor)
        runs_patched(model_a, handle, processor, images)
    check_pristine([model_a, model_b], processor, pristine, images)
    # After unpatch both work again, and neither copy carries the merged count.
    for clone in (copy.deepcopy(processor), pickle.loads(pickle.dumps(processor))):
        assert placeholder_counts(clone, encode(clone, [images["astronaut"]])) == pristine["counts"]

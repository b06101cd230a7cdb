"""The patched image path under ``torch.compile``: no graph breaks of ours, and compiled == eager.

Every token count is known before the model runs, so the merging tower and the projector stage can be
captured whole: dynamo must find no more graph breaks in the patched ``get_image_features`` than in the
unpatched one (the ones left are transformers' own), and the compiled path must give exactly what the
eager one gives, with the same counts and source maps.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import pitome_mllm
from pitome_mllm.methods import METHOD_SPECS, PROJECTOR
from pitome_mllm.testing.llava import encode, pitome_leftovers
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

pytestmark = pytest.mark.model_facing

TARGET_TOKENS = 16
# Methods that condition on the prompt cannot run from pixel values alone (get_image_features).
PIXEL_ONLY_METHODS = [name for name, spec in METHOD_SPECS.items() if not spec.needs_prompt]


def method_config(method: str) -> dict:
    """A configuration of ``method`` that reduces: a tower schedule at 0.9, or a projector-stage budget."""
    if METHOD_SPECS[method].stage == PROJECTOR or method == "none":
        return {"method": method, "target_tokens": TARGET_TOKENS}
    return {"method": method, "keep_ratio": 0.9}


# Tower variants whose code paths the plain configurations leave out.
TOWER_VARIANTS = {
    "keys_prop_attn_size_weighted_trim": {
        "method": "pitome",
        "keep_ratio": 0.8,
        "target_tokens": 20,
        "keep_order": True,
        "prop_attn": True,
        "metric": "keys",
        "reduce": "size_weighted",
    },
    "tome_keys_mean": {"method": "tome", "keep_ratio": 0.8, "metric": "keys_mean"},
    "paper_energy_mean": {"method": "pitome", "keep_ratio": 0.8, "energy": "paper", "reduce": "mean"},
    "keep_all": {"method": "pitome", "keep_ratio": 1.0},
}
CONFIGS = {method: method_config(method) for method in PIXEL_ONLY_METHODS} | TOWER_VARIANTS


@pytest.fixture(scope="module")
def pixel_values(tiny_llava, images):
    model, processor = tiny_llava
    pixel_values = encode(processor, [images["astronaut"], images["chelsea"]])["pixel_values"]
    # transformers installs its output-capturing hooks at the first forward (a graph break of its
    # own, under a lock): run one first so that every count below starts from the same model.
    image_features(model.model.get_image_features, pixel_values)
    return pixel_values


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def image_features(get_image_features, pixel_values) -> torch.Tensor:
    """``[num_images * tokens, D]`` the features handed to the language model."""
    with torch.no_grad():
        output = get_image_features(pixel_values=pixel_values)
    # transformers 5.x hands the per-image features out in ``pooler_output``; 4.57 returns them.
    return torch.cat(list(getattr(output, "pooler_output", output)))


def compiled_features(model, pixel_values, backend: str = "eager") -> tuple[torch.Tensor, int]:
    """The image features of two calls of the compiled ``get_image_features`` (the second runs the
    cached graphs; both must agree) and the graph breaks dynamo met while compiling it."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.model.get_image_features, backend=backend)
    first = image_features(compiled, pixel_values)
    assert torch.equal(image_features(compiled, pixel_values), first)
    return first, sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def unpatched_breaks(tiny_llava, pixel_values) -> int:
    return compiled_features(tiny_llava[0], pixel_values)[1]


def test_every_pixel_only_method_is_covered():
    assert set(PIXEL_ONLY_METHODS) <= set(CONFIGS)
    assert {"pitome", "tome", "none"} <= set(PIXEL_ONLY_METHODS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_equals_eager_without_graph_breaks_of_ours(tiny_llava, pixel_values, unpatched_breaks, name):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, **CONFIGS[name]) as handle:
        eager = image_features(model.model.get_image_features, pixel_values)
        eager_map = handle.final_token_map.clone()
        compiled, breaks = compiled_features(model, pixel_values)
        assert breaks <= unpatched_breaks, dict(counters["graph_break"])
        assert torch.equal(compiled, eager)
        assert torch.equal(handle.final_token_map, eager_map)
        assert eager.shape[0] == pixel_values.shape[0] * handle.num_visual_tokens


def test_explain_finds_no_more_breaks_patched(tiny_llava, pixel_values):
    """The measure users read: ``torch._dynamo.explain(...).graph_break_count``."""
    model, processor = tiny_llava

    def explained_breaks() -> int:
        torch._dynamo.reset()
        with torch.no_grad():
            return torch._dynamo.explain(model.model.get_image_features)(pixel_values=pixel_values).graph_break_count

    unpatched = explained_breaks()
    with pitome_mllm.patched(model, processor, method="pitome", keep_ratio=0.9):
        assert explained_breaks() <= unpatched


def test_unpatch_after_compile_restores_the_model(tiny_llava, pixel_values):
    model, processor = tiny_llava
    unpatched = image_features(model.model.get_image_features, pixel_values)
    with pitome_mllm.patched(model, processor, method="pitome", keep_ratio=0.9) as handle:
        compiled = torch.compile(model.model.get_image_features, backend="eager")
        merged = image_features(compiled, pixel_values)
        assert merged.shape[0] == pixel_values.shape[0] * handle.num_visual_tokens
    assert pitome_leftovers(model) == []
    # The graph compiled on the patched model is guarded on its overrides: the same compiled
    # function runs the restored model after unpatch().
    assert torch.equal(image_features(compiled, pixel_values), unpatched)
    assert torch.equal(image_features(model.model.get_image_features, pixel_values), unpatched)


def test_encoder_compiles_as_one_graph():
    """The patched encoder layers (merges included) capture with ``fullgraph=True``, as the unpatched ones do.

    On a model fresh from its builder: after the first forward, transformers' output-capturing hooks on
    the layers read a context variable, which breaks the encoder's graph patched or not.
    """
    model, processor = build_tiny_llava(TEST_SPEC)
    # transformers >= 5.12 keeps the embeddings and encoder on CLIPVisionModel itself; 4.x one level down.
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    with torch.no_grad():
        embeddings = tower.pre_layrnorm(tower.embeddings(torch.randn(2, 3, TEST_SPEC.image_size, TEST_SPEC.image_size)))
        unpatched = torch.compile(tower.encoder, fullgraph=True, backend="eager")(inputs_embeds=embeddings)
        assert torch.equal(unpatched.last_hidden_state, tower.encoder(inputs_embeds=embeddings).last_hidden_state)
        torch._dynamo.reset()
        with pitome_mllm.patched(model, processor, method="pitome", keep_ratio=0.9):
            eager = tower.encoder(inputs_embeds=embeddings).last_hidden_state
            compiled = torch.compile(tower.encoder, fullgraph=True, backend="eager")(inputs_embeds=embeddings)
    assert torch.equal(compiled.last_hidden_state, eager)
    assert eager.shape[1] < embeddings.shape[1]


def test_inductor_matches_eager(tiny_llava, pixel_values):
    """Inductor's fused kernels sum in another order: measured within 1.5e-8 of eager on these features."""
    model, processor = tiny_llava
    config = {"method": "pitome", "keep_ratio": 0.9, "target_tokens": 20, "keep_order": True}
    with pitome_mllm.patched(model, processor, **config) as handle:
        eager = image_features(model.model.get_image_features, pixel_values)
        eager_map = handle.final_token_map.clone()
        compiled = image_features(torch.compile(model.model.get_image_features), pixel_values)
        assert torch.equal(handle.final_token_map, eager_map)
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)

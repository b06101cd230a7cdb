"""The patched image path under ``torch.compile``: no graph breaks of ours, and compiled == eager.

Every token count is known before the model runs, so the merging tower and the projector stage can be
captured whole: dynamo must find no more graph breaks in the patched ``get_image_features`` than in the
unpatched one (the ones left are transformers' own), and the compiled path must give exactly what the
eager one gives, with the same counts and source maps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

import pitome_mllm
from pitome_mllm.hooks.observers import Observer
from pitome_mllm.methods import METHOD_SPECS, PROJECTOR
from pitome_mllm.testing.llava import encode, pitome_leftovers, prefill_features
from pitome_mllm.tools.profiling import PassClock, Stopwatch
from pitome_mllm.tools.profiling.runner import MergeTimer
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

pytestmark = pytest.mark.model_facing

TARGET_TOKENS = 16
# Methods that condition on the prompt cannot run from pixel values alone (get_image_features): they are
# compiled inside a forward that hands the prompt over.
PIXEL_ONLY_METHODS = [name for name, spec in METHOD_SPECS.items() if not spec.needs_prompt]
PROMPT_METHODS = [name for name, spec in METHOD_SPECS.items() if spec.needs_prompt]
PROMPTS = ("USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nWhat colour is the cup on the table? ASSISTANT:")


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


def test_every_method_is_covered():
    assert set(PIXEL_ONLY_METHODS) <= set(CONFIGS)
    assert {"pitome", "tome", "none"} <= set(PIXEL_ONLY_METHODS)
    assert set(PIXEL_ONLY_METHODS) | set(PROMPT_METHODS) == set(METHOD_SPECS)
    assert "cdpruner" in PROMPT_METHODS


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


# ------------------------------------------------------------------------------ methods reading the prompt
@contextlib.contextmanager
def compiled_image_path(model, backend: str = "eager"):
    """Inside the block, the model's forward encodes its images with a compiled ``get_image_features``."""
    core = model.model
    assert "get_image_features" not in core.__dict__
    core.get_image_features = torch.compile(core.get_image_features, backend=backend)
    try:
        yield
    finally:
        del core.get_image_features


def compiled_forward_features(model, inputs) -> tuple[torch.Tensor, int]:
    """The image features two forwards of ``inputs`` hand the language model, with the image path compiled
    (the second runs the cached graphs; both must agree), and the graph breaks dynamo met compiling it."""
    torch._dynamo.reset()
    counters.clear()
    with compiled_image_path(model):
        first = prefill_features(model, inputs)
        assert torch.equal(prefill_features(model, inputs), first)
    return first, sum(counters["graph_break"].values())


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_conditioned_image_path_compiles_without_graph_breaks_of_ours(tiny_llava, images, method):
    """The prompt's text tokens are chosen on the host when the prompt comes with its images, before
    they are encoded: the image path that reads them (tower, projector stage) adds no graph break."""
    model, processor = tiny_llava
    pair = [images["astronaut"], images["chelsea"]]
    unpatched_inputs = encode(processor, pair, PROMPTS)
    prefill_features(model, unpatched_inputs)  # transformers' first-forward hooks, as in `pixel_values`
    unpatched_breaks = compiled_forward_features(model, unpatched_inputs)[1]
    with pitome_mllm.patched(model, processor, method=method, target_tokens=TARGET_TOKENS) as handle:
        inputs = encode(processor, pair, PROMPTS)
        eager = prefill_features(model, inputs)
        eager_map = handle.final_token_map.clone()
        compiled, breaks = compiled_forward_features(model, inputs)
        assert breaks <= unpatched_breaks, dict(counters["graph_break"])
        assert torch.equal(compiled, eager)
        assert torch.equal(handle.final_token_map, eager_map)
        assert eager.shape[0] == len(pair) * handle.num_visual_tokens == len(pair) * TARGET_TOKENS
        # generate hands the prompt over before it encodes the images (transformers 5.19 on) or in its
        # first forward: the same selection either way.
        with compiled_image_path(model), torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert torch.equal(handle.final_token_map, eager_map)
        # Images without a prompt are still refused under compile.
        with compiled_image_path(model), pytest.raises(ValueError, match=r"came without one \(pixel values only"):
            image_features(model.model.get_image_features, inputs["pixel_values"])
    assert pitome_leftovers(model) == []


# ------------------------------------------------------------------------------------------------ observers
class StageLog(Observer):
    """Python bookkeeping only: every stage and merge it is told about, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def stage_started(self, stage, layer_idx) -> None:
        self.events.append(("started", stage, layer_idx))

    def stage_finished(self, stage, layer_idx) -> None:
        self.events.append(("finished", stage, layer_idx))

    def merged(self, layer_idx, step) -> None:
        self.events.append(("merged", layer_idx, step.num_output_tokens))


def test_observers_keeping_python_records_compile_without_graph_breaks(tiny_llava, pixel_values, unpatched_breaks):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, method="pitome", keep_ratio=0.9) as handle:
        log = StageLog()
        with handle.add_observer(log):
            eager = image_features(model.model.get_image_features, pixel_values)
            eager_events = list(log.events)
            log.events.clear()
            compiled, breaks = compiled_features(model, pixel_values)  # two calls
        assert breaks <= unpatched_breaks, dict(counters["graph_break"])
        assert torch.equal(compiled, eager)
        merged = [event for event in eager_events if event[0] == "merged"]
        assert len(merged) == len(handle.trace.token_counts) > 0
        assert ("started", "projector", None) in eager_events
        assert log.events == eager_events * 2  # told at every compiled call, as eagerly


def test_merge_timing_and_recording_refuse_a_compiled_forward_in_one_line(tiny_llava, pixel_values):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, method="pitome", keep_ratio=0.9) as handle:
        timer = MergeTimer()
        with handle.add_observer(timer):
            # No clock: the timer does nothing, and compiles (the compile-cost benchmark's compiled passes).
            compiled_features(model, pixel_values)
            timer.clock = PassClock(Stopwatch(torch.device("cpu")))
            with pytest.raises(
                RuntimeError,
                match=r"^MergeTimer times the merge stages on the host, which runs "
                r"eagerly only: time the model without torch\.compile[^\n]*$",
            ):
                compiled_features(model, pixel_values)
            image_features(model.model.get_image_features, pixel_values)  # eagerly it times
            assert len(timer.clock.merge_intervals["decide"]) == len(handle.trace.token_counts) > 0
        handle.record_merges(True)
        with pytest.raises(
            RuntimeError,
            match=r"^handle\.record_merges\(True\) keeps every merge step of a "
            r"forward, which runs eagerly only[^\n]*$",
        ):
            compiled_features(model, pixel_values)
        image_features(model.model.get_image_features, pixel_values)
        assert len(handle.trace.merges) > 0
        handle.record_merges(False)
        merged, breaks = compiled_features(model, pixel_values)
        assert torch.equal(merged, image_features(model.model.get_image_features, pixel_values))

"""The install / remove protocol every insertion point follows (`pitome_mllm.hooks.base.Hook`).

Units are installed in the adapter's order under one rollback and removed in reverse; a unit
that fails half-way leaves the model and the processor exactly as they were; wrappers keep the
wrapped function's identity; the projector stage acts only on the call that follows a tower
forward; what a family supports is class data, checked before anything is touched.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import pitome_mllm
from pitome_mllm.config import ALL_METHODS, PRESETS, PiToMeConfig
from pitome_mllm.hooks.base import Hook, install_in_order, remove_in_reverse
from pitome_mllm.hooks.state import MergeTrace, PatchState
from pitome_mllm.models import ADAPTERS
from pitome_mllm.models.clip_tower import clip_encoder_layers
from pitome_mllm.models.compat import transformers_version
from pitome_mllm.models.llava_hf import LlavaHFAdapter
from pitome_mllm.models.protocol import MERGE_SITES, OPTIONS, ModelAdapter

pytestmark = pytest.mark.model_facing

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
PROCESSOR_METHODS = ("replace_image_token", "_get_num_multimodal_tokens")


class Recorder(Hook):
    """Writes ``install name`` / ``remove name`` to a shared log; optionally fails in ``install``."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def install(self) -> None:
        self.log.append(f"install {self.name}")
        if self.fail:
            raise RuntimeError(f"{self.name} failed")

    def remove(self) -> None:
        self.log.append(f"remove {self.name}")


class HalfInstalled(Hook):
    """Puts a hook on ``module`` and an attribute on ``target``, then fails: its remove must undo both."""

    def __init__(self, module: torch.nn.Module, target: object) -> None:
        self.module, self.target = module, target
        self._handle = None

    def install(self) -> None:
        self._handle = self.module.register_forward_hook(lambda module, args, output: output * 0)
        self.target.__dict__["replace_image_token"] = lambda *args, **kwargs: "broken"
        raise RuntimeError("half-way failure")

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.target.__dict__.pop("replace_image_token", None)


def encode(processor, image):
    return processor(images=[image], text=[PROMPT], return_tensors="pt")


def snapshot(model, processor, image) -> dict:
    """Everything a failed patch must leave as it was: weights, forwards, hooks, processor methods, outputs."""
    inputs = encode(processor, image)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return {
        "state_dict": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "instance_forwards": {name: "forward" in module.__dict__ for name, module in model.named_modules()},
        "hooks": {
            name: (len(module._forward_hooks), len(module._forward_pre_hooks)) for name, module in model.named_modules()
        },
        "model_attributes": sorted(model.__dict__),
        "processor_attributes": {name: processor.__dict__.get(name) for name in PROCESSOR_METHODS},
        "input_ids": inputs["input_ids"].clone(),
        "logits": logits,
        "generated": generated,
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state_dict"].keys() == after["state_dict"].keys()
    for name, tensor in before["state_dict"].items():
        assert torch.equal(tensor, after["state_dict"][name]), name
    for key in ("instance_forwards", "hooks", "model_attributes", "processor_attributes"):
        assert before[key] == after[key], key
    for key in ("input_ids", "logits", "generated"):
        assert torch.equal(before[key], after[key]), key


# ---------------------------------------------------------------------------------------------- order
def test_install_in_order_and_remove_in_reverse():
    log: list[str] = []
    units = [Recorder(name, log) for name in "abc"]
    install_in_order(units)
    remove_in_reverse(units)
    assert log == ["install a", "install b", "install c", "remove c", "remove b", "remove a"]


def test_a_failing_unit_rolls_back_itself_and_every_earlier_unit_last_first():
    log: list[str] = []
    units = [Recorder("a", log), Recorder("b", log), Recorder("c", log, fail=True), Recorder("d", log)]
    with pytest.raises(RuntimeError, match="c failed"):
        install_in_order(units)
    assert log == ["install a", "install b", "install c", "remove c", "remove b", "remove a"]


def test_the_adapter_removes_its_units_in_reverse_order(tiny_llava, images, monkeypatch):
    model, processor = tiny_llava
    log: list[str] = []
    original_hooks = LlavaHFAdapter.hooks

    def recorded_hooks(adapter):
        units = original_hooks(adapter)
        return [
            unit for pair in zip(units, [Recorder(type(u).__name__, log) for u in units], strict=True) for unit in pair
        ]

    monkeypatch.setattr(LlavaHFAdapter, "hooks", recorded_hooks)
    handle = pitome_mllm.patch(model, processor, keep_ratio=0.9, target_tokens=16, llm_prop_attn=True)
    handle.unpatch()
    names = ["TowerMerger", "ProjectorMerger", "ProcessorOverrides", "PlaceholderCheck", "LLMPropAttention"]
    assert log == [f"install {name}" for name in names] + [f"remove {name}" for name in reversed(names)]


# ---------------------------------------------------------------------------------------------- rollback
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_failure_anywhere_in_the_install_leaves_model_and_processor_identical(tiny_llava, images, monkeypatch, where):
    model, processor = tiny_llava
    before = snapshot(model, processor, images["coffee"])
    original_hooks = LlavaHFAdapter.hooks

    def failing_hooks(adapter):
        units = original_hooks(adapter)
        failing = HalfInstalled(adapter.projector, adapter.processor)
        position = {"first": 0, "middle": len(units) // 2, "last": len(units)}[where]
        return [*units[:position], failing, *units[position:]]

    monkeypatch.setattr(LlavaHFAdapter, "hooks", failing_hooks)
    with pytest.raises(RuntimeError, match="half-way failure"):
        pitome_mllm.patch(model, processor, keep_ratio=0.9, target_tokens=16, llm_prop_attn=True)
    assert pitome_mllm.get_patch(model) is None
    assert_same(before, snapshot(model, processor, images["coffee"]))


def test_a_failure_in_a_shipped_unit_is_rolled_back(tiny_llava, images, monkeypatch):
    """The placeholder check refuses a core that already carries an override: the units before it come out."""
    model, processor = tiny_llava
    before = snapshot(model, processor, images["astronaut"])
    from pitome_mllm.models import llava_hf

    def refuse(self):
        raise RuntimeError("core forward taken")

    monkeypatch.setattr(llava_hf.PlaceholderCheck, "install", refuse)
    with pytest.raises(RuntimeError, match="core forward taken"):
        pitome_mllm.patch(model, processor, method="fastervlm", target_tokens=12)
    assert_same(before, snapshot(model, processor, images["astronaut"]))


# ---------------------------------------------------------------------------------------------- wrappers
def test_wrappers_keep_the_wrapped_functions_identity(tiny_llava):
    model, processor = tiny_llava
    layers = clip_encoder_layers(model.model.vision_tower)
    # transformers 4.x's processor count is patched through an attribute (num_additional_image_tokens), not methods.
    processor_methods = PROCESSOR_METHODS if transformers_version()[0] >= 5 else ()

    def wrappable():
        functions = {
            "layer": layers[0].forward,
            "skipped": layers[-1].forward,
            "core": model.model.forward,
            "generate": model.generate,
        }
        return functions | {name: getattr(processor, name) for name in processor_methods}

    originals = wrappable()
    with pitome_mllm.patched(model, processor, method="cdpruner", target_tokens=12):
        wrapped = wrappable()
        for key, original in originals.items():
            assert wrapped[key] is not original, key
            assert wrapped[key].__wrapped__ == original, key
            assert wrapped[key].__name__ == original.__name__, key
            assert wrapped[key].__doc__ == original.__doc__, key
            assert inspect.signature(wrapped[key]) == inspect.signature(original), key
    assert layers[0].forward == originals["layer"] and model.generate == originals["generate"]
    assert "replace_image_token" not in processor.__dict__ and "forward" not in model.model.__dict__


# ---------------------------------------------------------------------------------------------- state
def test_patch_state_hands_a_tower_trace_to_one_projector_call():
    state = PatchState()
    assert state.take_tower_trace() is None
    trace = MergeTrace.start(torch.zeros(2, 5, 3), record_merges=False)
    state.start_tower_forward(trace)
    assert state.take_tower_trace() is trace and state.trace is trace
    assert state.take_tower_trace() is None and state.trace is trace  # taken once; the handle still reads it
    state.start_tower_forward(trace)
    state.clear()
    assert state.take_tower_trace() is None and state.trace is None


@pytest.mark.parametrize(
    "settings",
    [{"keep_ratio": 0.9, "target_tokens": 16}, {"method": "fastervlm", "target_tokens": 12}],
    ids=["projector_merge", "selection"],
)
def test_projector_called_alone_after_a_forward_is_left_alone(tiny_llava, images, settings):
    """Features of the tower output's exact shape, handed to the projector after a forward, are not merged again."""
    model, processor = tiny_llava
    projector = model.model.multi_modal_projector
    with pitome_mllm.patched(model, processor, **settings) as handle:
        with torch.no_grad():
            model(**encode(processor, images["chelsea"]))
        tower_tokens = handle.trace.size.shape[1] - 1  # class token dropped before the projector
        features = torch.randn(1, tower_tokens, model.config.vision_config.hidden_size)
        final_map = handle.final_token_map.clone()
        with torch.no_grad():
            alone = projector(features)
        assert torch.equal(handle.final_token_map, final_map)  # the stage did not run
    with torch.no_grad():
        assert torch.equal(alone, projector(features))


# ---------------------------------------------------------------------------------------------- capabilities
@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda adapter: adapter.family)
def test_adapters_declare_what_they_support_as_class_data(adapter):
    assert set(adapter.methods) <= set(ALL_METHODS) and "none" in adapter.methods
    assert set(adapter.presets) <= set(PRESETS) and adapter.presets
    assert adapter.options <= set(OPTIONS)
    assert set(adapter.merge_sites) <= set(MERGE_SITES) and adapter.merge_sites
    for method in set(ALL_METHODS) - set(adapter.methods):
        with pytest.raises(ValueError, match=f"method='{method}'"):
            adapter.check_supported(PiToMeConfig(method=method, target_tokens=16))


def test_an_undeclared_option_is_refused_naming_who_supports_it():
    class NoOptions(ModelAdapter):
        family = "no_options"

    with pytest.raises(
        ValueError, match="llm_prop_attn=True is not supported for the no_options family; only llava_hf"
    ):
        NoOptions.check_supported(PiToMeConfig(keep_ratio=0.9, llm_prop_attn=True))
    NoOptions.check_supported(PiToMeConfig(keep_ratio=0.9))

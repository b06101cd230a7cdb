"""Entry points that register the ``pitome_llava_hf``, ``pitome_llava``, ``pitome_qwen2_5_vl`` and
``pitome_qwen3_vl`` models with lmms-eval.

pyproject.toml names `manifest` under ``[project.entry-points."lmms_eval.models"]``; lmms-eval
calls it while building its model registry. lmms-eval loads every plugin entry point in one
``try`` block, so an exception here would hide *all* plugins: this module imports nothing at
load time, and the model class (torch, transformers) is only imported when a run asks for it.
"""

from __future__ import annotations

MODEL_ID = "pitome_llava_hf"
CLASS_PATH = "pitome_mllm.integrations.lmms_eval.llava_hf.PiToMeLlavaHF"
# The original LLaVA code (`llava` package), for reproducing the paper's harness.
LLAVA_ORIGINAL_MODEL_ID = "pitome_llava"
LLAVA_ORIGINAL_CLASS_PATH = "pitome_mllm.integrations.lmms_eval.llava_original.PiToMeLlava"
# transformers Qwen2.5-VL and Qwen3-VL checkpoints.
QWEN2_5_VL_MODEL_ID = "pitome_qwen2_5_vl"
QWEN2_5_VL_CLASS_PATH = "pitome_mllm.integrations.lmms_eval.qwen_vl.PiToMeQwen2_5_VL"
QWEN3_VL_MODEL_ID = "pitome_qwen3_vl"
QWEN3_VL_CLASS_PATH = "pitome_mllm.integrations.lmms_eval.qwen_vl.PiToMeQwen3_VL"


def manifest():
    """The ``ModelManifest`` lmms-eval registers: a simple (non-chat) model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def manifest_llava_original():
    """The ``ModelManifest`` of ``pitome_llava`` (original LLaVA checkpoints)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LLAVA_ORIGINAL_MODEL_ID, simple_class_path=LLAVA_ORIGINAL_CLASS_PATH)


def manifest_qwen2_5_vl():
    """The ``ModelManifest`` of ``pitome_qwen2_5_vl`` (transformers Qwen2.5-VL checkpoints)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=QWEN2_5_VL_MODEL_ID, simple_class_path=QWEN2_5_VL_CLASS_PATH)


def manifest_qwen3_vl():
    """The ``ModelManifest`` of ``pitome_qwen3_vl`` (transformers Qwen3-VL checkpoints)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=QWEN3_VL_MODEL_ID, simple_class_path=QWEN3_VL_CLASS_PATH)

"""Entry points that register the ``pitome_llava_hf`` and ``pitome_llava`` models with lmms-eval.

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


def manifest():
    """The ``ModelManifest`` lmms-eval registers: a simple (non-chat) model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def manifest_llava_original():
    """The ``ModelManifest`` of ``pitome_llava`` (original LLaVA checkpoints)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LLAVA_ORIGINAL_MODEL_ID, simple_class_path=LLAVA_ORIGINAL_CLASS_PATH)

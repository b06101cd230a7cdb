"""Helpers of the offline ``pitome_smoke`` task (resolved by lmms-eval's ``!function utils.x``)."""

from __future__ import annotations

from pitome_mllm.assets import load_image


def smoke_doc_to_visual(doc: dict) -> list:
    """The bundled photograph the row names, as a one-element list of RGB PIL images."""
    return [load_image(doc["image"])]


def smoke_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question with the task's prompt prefix and answer-format suffix."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"

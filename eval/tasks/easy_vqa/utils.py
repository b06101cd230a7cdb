"""Helpers of the offline ``easy_vqa`` task (resolved by lmms-eval's ``!function utils.x``).

Images are read from the installed ``easy-vqa`` package; the prompt text and answer
normalisation come from `pitome_mllm.experiments.proxy.easy_vqa`, the same code the mini-LLaVA was trained
with, so training and evaluation prompts cannot drift apart.
"""

from __future__ import annotations

from pitome_mllm.experiments.proxy import easy_vqa


def easy_vqa_doc_to_visual(doc: dict) -> list:
    """The test image the row names, as a one-element list of RGB PIL images."""
    return [easy_vqa.load_image("test", int(doc["image_id"]))]


def easy_vqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question followed by the answer-format line the model was trained with."""
    return easy_vqa.doc_to_text(doc["question"])


def easy_vqa_process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after normalisation, overall and for the question's kind (None for the other kinds)."""
    hit = float(easy_vqa.normalise_answer(results[0]) == doc["answer"])
    scores = {"accuracy": hit}
    for kind, metric in easy_vqa.KIND_METRICS.items():
        scores[metric] = hit if doc["kind"] == kind else None
    return scores


def mean_of_answered(values: list) -> float:
    """Mean over the rows a metric applies to (rows of another question kind hold None)."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else float("nan")

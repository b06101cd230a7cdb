"""What the tests run on transformers LLaVA models (1.5, NeXT, OneVision, SigLIP towers): batches from the
processor, logits, the placeholders and image features the language model receives, and what a patch left
behind. One definition each, imported by the test modules (tests/conftest.py holds the fixtures)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..common.prompts import IMAGE_TOKEN

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


def encode(processor, images, prompts: str | Sequence[str] = PROMPT):
    """Padded torch inputs of ``processor`` for ``images`` and ``prompts``.

    ``images``: one image or a list / tuple of them. ``prompts``: one per row of the batch (a prompt may hold
    several ``<image>`` placeholders), or a single string: one prompt per image when it holds one placeholder,
    else the one prompt of a one-row batch.
    """
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if isinstance(prompts, str):
        prompts = [prompts] * len(images) if prompts.count(IMAGE_TOKEN) == 1 else [prompts]
    return processor(images=images, text=list(prompts), return_tensors="pt", padding=True)


def logits_of(model, inputs) -> torch.Tensor:
    """``[B, L, vocab]`` logits of one forward without gradients."""
    with torch.no_grad():
        return model(**inputs).logits


def placeholder_counts(processor, inputs) -> list[int]:
    """Image placeholders in each prompt of ``inputs``."""
    return (inputs["input_ids"] == processor.tokenizer.image_token_id).sum(dim=-1).tolist()


@contextlib.contextmanager
def features_reaching_llm(model) -> Iterator[list[torch.Tensor]]:
    """Record every ``image_features`` tensor LLaVA checks against its placeholders (``[tokens, D]``)."""
    llava = model.model
    original = llava.get_placeholder_mask
    seen: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        seen.append(kwargs["image_features"].detach().clone())
        return original(*args, **kwargs)

    llava.get_placeholder_mask = recording
    try:
        yield seen
    finally:
        del llava.get_placeholder_mask


def prefill_features(model, inputs) -> torch.Tensor:
    """The image features of one forward, ``[num_images * tokens, D]``."""
    with features_reaching_llm(model) as seen, torch.no_grad():
        model(**inputs)
    assert len(seen) == 1
    return seen[0]


def pitome_leftovers(model) -> list[str]:
    """Modules still carrying an instance forward / generate, a hook or an attribute from this library.

    Any instance ``forward`` counts (the unpatched modules have none), whoever defined it.
    """

    def ours(function) -> bool:
        return (getattr(function, "__module__", None) or "").startswith("pitome_mllm")

    left = []
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        # An override made with functools.wraps carries the wrapped __module__: look for generate itself.
        if "forward" in module.__dict__ or "generate" in module.__dict__ or any(map(ours, hooks)):
            left.append(name)
        if any(attribute.startswith("_pitome") for attribute in module.__dict__):
            left.append(name)
    return left


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""Prompt text for LLaVA-style models: the one place that knows how a task's context and its images
become the text a processor is given (the lmms-eval plugin and the proxy benchmarks share it)."""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's evaluation prompt (conversation template "vicuna_v1"): the format the released
# checkpoints were trained with and that the LLaVA-1.5 and PiToMe papers evaluated with.
LLAVA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS = ("chat_template", "llava_v1")


def build_prompt(processor, context: str, num_images: int, prompt_format: str = "chat_template") -> str:
    """The text given to the processor for a task context and ``num_images`` images.

    ``chat_template`` renders ``[image] * num_images + [text]`` with the processor's chat template,
    which is what lmms-eval's own ``llava_hf`` does; ``llava_v1`` (also the fallback for a
    processor without a template) is ``"<system> USER: <image>\\n<text> ASSISTANT:"``.
    ``<image>`` markers already in the context are dropped: images always come first.
    """
    text = context.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in context else context
    if prompt_format == "chat_template" and getattr(processor, "chat_template", None):
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = f"{' '.join([IMAGE_TOKEN] * num_images)}\n" if num_images else ""
    return f"{LLAVA_V1_SYSTEM} USER: {images}{text} ASSISTANT:"

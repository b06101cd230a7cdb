"""Stream a greedy ``generate`` call's text as it is produced, timed stage by stage.

Shared by ``pitome-mllm chat`` / ``chat-llava`` (which write the text to the terminal) and the web
page (which writes it into the page): the model runs in a worker thread, the caller's thread copies
the streamed text into a writable and times the call with `pitome_mllm.runtime.loading.StageTimer`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class TurnStats:
    visual_tokens: int
    vision_s: float
    prefill_s: float
    total_s: float
    output_tokens: int

    def line(self) -> str:
        return (
            f"[{self.visual_tokens} visual tokens, vision {self.vision_s * 1e3:.0f} ms, "
            f"prefill {self.prefill_s * 1e3:.0f} ms, total {self.total_s:.2f} s]"
        )


def stream_turn(
    model, tokenizer, out: TextIO, visual_tokens: Callable[[Any], int], prompt_length: int, **generate_kwargs
) -> tuple[str, TurnStats]:
    """Answer one turn greedily, streaming it into ``out``: ``(answer, its TurnStats)``.

    Args:
        visual_tokens: ``StageTimer -> visual tokens per image`` (from the prompt, or as the run measured them).
        prompt_length: leading tokens of ``generate``'s output that repeat the prompt (0: it returns only new ones).
    """
    from transformers import TextIteratorStreamer

    from .loading import StageTimer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    timer = StageTimer(model)
    answer, output_ids = stream_generate(model, streamer, timer, out, **generate_kwargs, do_sample=False)
    stats = TurnStats(
        visual_tokens=visual_tokens(timer),
        vision_s=timer.vision_s,
        prefill_s=timer.prefill_s,
        total_s=timer.total_s,
        output_tokens=int(output_ids.shape[1] - prompt_length),
    )
    return answer, stats


def stream_generate(model, streamer, timer, out: TextIO, **generate_kwargs) -> tuple[str, Any]:
    """Run ``model.generate`` in a worker thread and copy the streamed text into ``out``.

    ``timer`` (a context manager such as `StageTimer`) is entered around the whole generation.
    Returns the answer text (stripped) and what ``generate`` returned. An error raised inside
    ``generate`` is re-raised here, in the caller's thread.
    """
    import torch

    generation: dict[str, Any] = {}

    def generate() -> None:
        try:
            with torch.inference_mode():
                generation["ids"] = model.generate(streamer=streamer, **generate_kwargs)
        except BaseException as error:  # re-raised in the caller's thread
            generation["error"] = error
            streamer.end()  # unblock the reader; generate() never reached its own end()

    pieces = []
    with timer:
        worker = threading.Thread(target=generate, name="pitome-mllm-generate", daemon=True)
        worker.start()
        for text in streamer:
            pieces.append(text)
            out.write(text)
            out.flush()
        worker.join()
    out.write("\n")
    if "error" in generation:
        raise generation["error"]
    return "".join(pieces).strip(), generation["ids"]


__all__ = ["TurnStats", "stream_generate", "stream_turn"]

"""``pitome-mllm chat-llava``: ``chat`` for checkpoints of the original LLaVA code (``llava`` package).

Same flags and output as ``pitome-mllm chat``, for models such as ``liuhaotian/llava-v1.5-7b``
loaded with llava's own builder and prompted with its conversation templates (``vicuna_v1``
for LLaVA-1.5). The prompt carries one image marker and the model splices in however many
visual tokens the (merged) tower returns, so the visual-token count in the timing line is
measured at the projector. Unpatched runs get the ``generate`` compatibility wrapper only.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .chat import UNPATCHED, TurnStats, add_session_arguments, run_chat, stream_turn

HELP = (
    "chat about an image with a PiToMe-patched original LLaVA checkpoint (llava package, e.g. liuhaotian/llava-v1.5-7b)"
)

DEFAULT_CONV_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's; llava.conversation.conv_templates lists the others


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_ID",
        help="an original LLaVA folder or hub id (e.g. liuhaotian/llava-v1.5-7b), or 'tiny' for an offline tiny model",
    )
    parser.add_argument("--model-base", metavar="PATH_OR_ID", help="base LLM of a projector-only or LoRA checkpoint")
    parser.add_argument(
        "--model-name", help="name llava picks the architecture by (default: from the path; must contain 'llava')"
    )
    parser.add_argument("--conv-mode", default=DEFAULT_CONV_TEMPLATE, help="llava conversation template")
    add_session_arguments(parser)


# ------------------------------------------------------------------------------------ chat
@dataclass
class LlavaChatSession:
    """A conversation about one image with an original LLaVA model."""

    model: Any
    tokenizer: Any
    image_processor: Any
    image: Any
    conv_template: str
    max_new_tokens: int
    turns: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, question: str, out: TextIO) -> TurnStats:
        """Stream the answer to ``question`` into ``out``; remember the turn."""
        from ..runtime.llava_original import build_prompt, prepare_images, tokenize_prompt

        image_start_end = bool(getattr(self.model.config, "mm_use_im_start_end", False))
        prompt = build_prompt([*self.turns, (question, None)], self.conv_template, image_start_end)
        input_ids = tokenize_prompt(prompt, self.tokenizer)[None].to(self.model.device)
        answer, stats = stream_turn(
            self.model,
            self.tokenizer,
            out,
            # llava splices the projector's output: the count is known once the tower ran.
            lambda timer: timer.visual_tokens,
            # Generating from embeddings, llava's generate returns only the new tokens.
            prompt_length=0,
            inputs=input_ids,
            images=prepare_images([self.image], self.image_processor, self.model),
            image_sizes=[self.image.size],
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.turns.append((question, answer))
        return stats


# ---------------------------------------------------------------------------------- loading
def _load_tiny(spec_name: str, args: argparse.Namespace):
    """An offline tiny random original-LLaVA model (``tiny``: CLIP-L/14-336 geometry)."""
    from ..runtime.loading import resolve_device, resolve_dtype
    from ..zoo.tiny import DEMO_SPEC, TEST_SPEC
    from ..zoo.tiny_llava_original import build_tiny_llava_original

    if args.load_in_4bit or args.load_in_8bit:
        raise ValueError(f"cannot quantise the built-in {args.model!r} model")
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="pitome-tiny-llava-") as folder:
        # The tower is read from the folder once, during the build.
        model, tokenizer, image_processor = build_tiny_llava_original(
            folder, DEMO_SPEC if spec_name == "demo" else TEST_SPEC
        )
    return tokenizer, model.to(device=device, dtype=resolve_dtype(args.dtype, device)), image_processor


def load(args: argparse.Namespace):
    """``(tokenizer, model, image_processor)`` for the arguments."""
    from ..runtime.llava_original import load_llava_original
    from ..runtime.loading import TINY_MODEL_NAMES

    spec_name = TINY_MODEL_NAMES.get(args.model)
    if spec_name is not None:
        return _load_tiny(spec_name, args)
    tokenizer, model, image_processor, _ = load_llava_original(
        args.model,
        args.model_base,
        model_name=args.model_name,
        dtype=args.dtype,
        device=args.device,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
    )
    return tokenizer, model, image_processor


def _check_conv_mode(conv_mode: str) -> None:
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"unknown --conv-mode {conv_mode!r}; one of {', '.join(sorted(conv_templates))}")


def _load_checked(args: argparse.Namespace):
    from ..models.llava_original import require_llava

    require_llava()
    _check_conv_mode(args.conv_mode)
    return load(args)


def _install(loaded: tuple[Any, Any, Any], config: dict[str, Any] | None) -> tuple[str, Callable[[], None]]:
    from .. import patch
    from ..models.llava_original import enable_generate_compat

    _, model, image_processor = loaded
    if config is None:
        # Unpatched models still need the generate wrapper on transformers 5.x.
        return UNPATCHED, enable_generate_compat(model).remove
    handle = patch(model, image_processor, **config)
    return repr(handle), handle.unpatch


def run(args: argparse.Namespace) -> int:
    def new_session(loaded, image) -> LlavaChatSession:
        tokenizer, model, image_processor = loaded
        return LlavaChatSession(model, tokenizer, image_processor, image, args.conv_mode, args.max_new_tokens)

    return run_chat(args, "chat-llava", lambda: _load_checked(args), _install, new_session)

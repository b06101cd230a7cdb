"""``pitome-mllm chat``: talk about one image with a (patched) LLaVA model, streaming the answers.

Questions come from stdin, one per line; ``--prompt`` answers one question and exits.
The image goes with the first question and the conversation is kept, so later questions
can refer to earlier answers. Each turn re-runs the prompt of the whole conversation
(image included), so the timing line after an answer is what that turn cost.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..runtime.streaming import TurnStats, stream_generate, stream_turn  # noqa: F401 (re-exported)
from ..runtime.terminal import add_threads_argument
from .arguments import (
    IMAGE_HELP,
    add_budget_arguments,
    add_loading_arguments,
    add_method_argument,
    add_preset_argument,
    add_quantization_arguments,
)

HELP = "chat about an image with a PiToMe-patched LLaVA model (streams answers, reports visual tokens and latency)"

EXIT_WORDS = ("exit", "quit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_ID",
        help="a local LLaVA folder, a hub id (e.g. llava-hf/llava-1.5-7b-hf), or 'tiny' for the offline tiny model",
    )
    add_session_arguments(parser)


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """Image, merge settings, loading and generation flags shared by ``chat`` and ``chat-llava``."""
    parser.add_argument("--image", required=True, metavar="IMG", help=IMAGE_HELP)
    add_budget_arguments(parser)
    add_preset_argument(parser, help=None)
    add_method_argument(parser)
    parser.add_argument("--keep-order", action="store_true", help="hand merged tokens to the LLM in raster order")
    add_quantization_arguments(parser)
    add_loading_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    add_threads_argument(parser)
    parser.add_argument("--prompt", metavar="TEXT", help="answer this one question and exit")


def checked_patch_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """`patch_config`, validated before any model is loaded (bad values raise ValueError)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    config = patch_config(args)
    if config is not None:
        from ..config import PiToMeConfig

        PiToMeConfig(**config)
    return config


def answer_questions(session, args: argparse.Namespace) -> None:
    """Answer ``--prompt`` or every question read from stdin, printing a timing line after each."""
    if args.prompt is not None:
        questions = [args.prompt]
    else:
        interactive = sys.stdin.isatty()
        if interactive:
            print("Ask about the image; 'exit', 'quit' or Ctrl-D ends the chat.", file=sys.stderr)
        questions = read_questions(sys.stdin, interactive)
    for question in questions:
        stats = session.ask(question, sys.stdout)
        print(stats.line())


def patch_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``patch()`` keywords the arguments ask for; None when no merge flag was given at all.

    Any merge flag (``--method``, ``--preset``, ``--keep-order``, a budget) asks for a patch, so a
    setting that ``patch()`` refuses (``--method random`` without ``--target-tokens``) is refused
    here too, never run unpatched.
    """
    merge_flags = (args.keep_ratio, args.target_tokens, args.keep_order or None)
    if all(flag is None for flag in merge_flags) and (args.method, args.preset) == ("pitome", "reference"):
        return None
    config: dict[str, Any] = {"method": args.method, "preset": args.preset, "keep_order": args.keep_order}
    if args.keep_ratio is not None:
        config["keep_ratio"] = args.keep_ratio
    if args.target_tokens is not None:
        config["target_tokens"] = args.target_tokens
    return config


@dataclass
class ChatSession:
    """A conversation about one image: ``(question, answer)`` turns, the image in the first."""

    model: Any
    processor: Any
    image: Any
    max_new_tokens: int
    turns: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, question: str, out: TextIO) -> TurnStats:
        """Stream the answer to ``question`` into ``out``; remember the turn."""
        from ..runtime.loading import build_conversation_prompt, count_image_tokens

        prompt = build_conversation_prompt(self.processor, [*self.turns, (question, None)])
        inputs = self.processor(images=self.image, text=prompt, return_tensors="pt").to(self.model.device)
        visual_tokens = count_image_tokens(self.processor, inputs["input_ids"])
        answer, stats = stream_turn(
            self.model,
            self.processor.tokenizer,
            out,
            lambda timer: visual_tokens,
            prompt_length=inputs["input_ids"].shape[1],
            **inputs,
            max_new_tokens=self.max_new_tokens,
        )
        self.turns.append((question, answer))
        return stats


def read_questions(stream: TextIO, interactive: bool):
    """Non-empty lines of ``stream`` until EOF or an exit word (shared by ``chat`` and ``chat-llava``)."""
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = stream.readline()
        if not line:
            return
        question = line.strip()
        if question.lower() in EXIT_WORDS:
            return
        if question:
            yield question


def _load(args: argparse.Namespace):
    from ..runtime.loading import load_model

    return load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
    )


def run_chat(
    args: argparse.Namespace,
    command: str,
    load: Callable[[], Any],
    install: Callable[[Any, dict[str, Any] | None], tuple[str, Callable[[], None]]],
    new_session: Callable[[Any, Any], Any],
) -> int:
    """The body of ``chat`` and ``chat-llava``: load, patch, answer the questions, undo the patch.

    Args:
        command: the command's name, for the one-line setup error.
        load: ``() -> model bundle``; an ImportError (an optional package missing) is a setup
            problem, reported in one line with exit status 2.
        install: ``(bundle, patch keywords or None) -> (description, undo)``.
        new_session: ``(bundle, image) -> session`` that `answer_questions` talks to.
    """
    from ..runtime.loading import load_image_arg
    from ..runtime.terminal import torch_threads, warn_if_busy

    with torch_threads(args.threads):
        config = checked_patch_config(args)
        image = load_image_arg(args.image)
        try:
            bundle = load()
        except ImportError as error:
            print(f"pitome-mllm {command}: error: {error}", file=sys.stderr)
            return 2
        description, undo = install(bundle, config)
        try:
            print(f"{args.model}: {description}", file=sys.stderr)
            warn_if_busy()  # the answers print their timings
            answer_questions(new_session(bundle, image), args)
        finally:
            undo()
    return 0


UNPATCHED = "unpatched (no --keep-ratio / --target-tokens)"


def _install(loaded: tuple[Any, Any], config: dict[str, Any] | None) -> tuple[str, Callable[[], None]]:
    from .. import patch

    if config is None:
        return UNPATCHED, lambda: None
    handle = patch(*loaded, **config)
    return repr(handle), handle.unpatch


def run(args: argparse.Namespace) -> int:
    return run_chat(
        args,
        "chat",
        lambda: _load(args),
        _install,
        lambda loaded, image: ChatSession(*loaded, image, args.max_new_tokens),
    )

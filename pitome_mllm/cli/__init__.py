"""``pitome-mllm`` command line: thin wrappers that parse, call the library, print.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; modules keep heavy imports
(transformers, matplotlib) inside ``run`` so that ``pitome-mllm --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .extras import MissingExtra, check_extras

# subcommand -> module implementing it
COMMANDS: dict[str, str] = {
    "schedule": "pitome_mllm.cli.schedule",
    "sweep": "pitome_mllm.cli.sweep",
    "profile": "pitome_mllm.cli.profile",
    "demo": "pitome_mllm.cli.demo",
    "chat": "pitome_mllm.cli.chat",
    "chat-llava": "pitome_mllm.cli.chat_llava",
    "visualize": "pitome_mllm.cli.visualize",
    "spectral": "pitome_mllm.cli.spectral",
    "proxy": "pitome_mllm.cli.proxy",
    "serve": "pitome_mllm.cli.serve",
    "web": "pitome_mllm.cli.web",
}


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(with_arguments: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``pitome-mllm`` parser; only the subcommands in ``with_arguments`` (None: all) get their options.

    A subcommand's options can need its heavy imports (torch, transformers), so ``--help`` and a light
    command such as ``schedule`` build only what they show.
    """
    parser = argparse.ArgumentParser(
        prog="pitome-mllm",
        description="Spectrum-preserving token merging (PiToMe) for LLaVA-style multimodal LLMs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gets patched and planned")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        if with_arguments is None or name in with_arguments:
            module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


# Commands that hand everything after ``--`` to another program (``args.passthrough``).
PASSTHROUGH_COMMANDS = ("serve",)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` before the first ``--``, and what follows it."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def main(argv: list[str] | None = None) -> int:
    argv, passthrough = split_passthrough(sys.argv[1:] if argv is None else list(argv))
    command = chosen_command(argv)
    parser = build_parser([] if command is None else [command])
    args = parser.parse_args(argv)
    if passthrough and args.command not in PASSTHROUGH_COMMANDS:
        parser.error(
            f"arguments after -- ({' '.join(passthrough)}) are taken only by: {', '.join(PASSTHROUGH_COMMANDS)}"
        )
    args.passthrough = passthrough
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        # A missing optional package is named before the command writes or loads anything.
        check_extras(args.command, args)
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, MissingExtra) as error:
        # Bad input or a missing extra: one clear line, not a traceback.
        print(f"pitome-mllm {args.command}: error: {error}", file=sys.stderr)
        return 2

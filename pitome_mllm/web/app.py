"""The Gradio page of ``pitome-mllm web`` (needs the ``[web]`` extra).

Handlers never raise into Gradio: a refused upload, an invalid setting or a failed run is written
into the page (``upload-message``, ``plan``, the answer's stats line), and the page stays usable.
The page's elements carry ``elem_id``s (listed in `ELEMENT_IDS`) that the browser test finds them by.
"""

# No ``from __future__ import annotations`` here: Gradio reads the handlers' annotations at runtime
# (a ``gr.SelectData`` parameter receives the click) and cannot resolve them as strings.
from typing import Any

from ..assets import list_images, load_image
from ..config import ALL_METHODS, DEFAULT_PRESET, PRESETS
from .openai_client import OpenAIClient, ServedAnswer, ServerError
from .session import (
    BUDGETS,
    MAX_UPLOAD_BYTES,
    DemoSession,
    MergeMap,
    UploadError,
    open_upload,
    settings_from_page,
)

GRADIO_MISSING = "the web page needs Gradio: pip install 'pitome-mllm[web]' (in a checkout: pip install -e '.[web]')"
RANDOM_WEIGHTS_NOTE = (
    "**This model has random weights** (the offline tiny model): its answers are noise. "
    "The token counts, timings, KV-cache sizes and merge maps are real; load a checkpoint with `--model` "
    "for real answers."
)
DEFAULT_TARGET_TOKENS = {"target_tokens": 144, "keep_ratio": 0.9}
ELEMENT_IDS = (
    "upload",
    "upload-message",
    "bundled-image",
    "image",
    "method",
    "preset",
    "budget",
    "budget-value",
    "plan",
    "question",
    "ask",
    "answer-unpatched",
    "stats-unpatched",
    "answer-patched",
    "stats-patched",
    "merge-map",
    "token-info",
)


def import_gradio():
    """Gradio, or ImportError with the one-line pip command that installs it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(GRADIO_MISSING) from error
    return gradio


def default_target(session: DemoSession | None) -> int:
    """A quarter of the unpatched visual tokens (144 of LLaVA-1.5's 576)."""
    return max(1, session.unpatched_tokens // 4) if session is not None else DEFAULT_TARGET_TOKENS["target_tokens"]


def build_app(session: DemoSession | None = None, client: OpenAIClient | None = None, model_name: str = ""):
    """The page: compares ``session``'s model unpatched and patched, or streams ``client``'s server answers.

    Exactly one of ``session`` (a loaded model) and ``client`` (a running ``pitome-mllm serve``) is given.
    """
    if (session is None) == (client is None):
        raise ValueError("build_app needs exactly one of session (a loaded model) and client (a server)")
    gr = import_gradio()
    local = session is not None
    bundled = list_images()

    def plan_text(method: str, preset: str, budget: str, value: float | None) -> str:
        if not local:
            return "The server's own setting decides the merging (`pitome-mllm serve ... --target-tokens N`)."
        try:
            return session.plan(settings_from_page(method, preset, budget, value)).describe()
        except ValueError as error:
            return f"**Invalid setting:** {error}"

    def pick_bundled(name: str):
        return load_image(name), ""

    def take_upload(path: str | None, current):
        """``(image to use, message, upload box)``: the box is emptied so the next upload can follow."""
        if path is None:
            return current, "", None
        try:
            return open_upload(path), "", None
        except UploadError as error:
            return current, f"**Upload refused:** {error}", None

    def ask(image, question: str, method: str, preset: str, budget: str, value: float | None):
        """Stream ``(unpatched answer, its stats, patched answer, its stats, merge map, map state, token info)``."""
        if local:
            yield from ask_local(image, question, method, preset, budget, value)
        else:
            yield from ask_server(image, question)

    def ask_local(image, question, method, preset, budget, value):
        try:
            settings = settings_from_page(method, preset, budget, value)
            session.plan(settings)
            updates = session.compare(image, question, settings)
            for unpatched, patched, merge_map in updates:
                yield (
                    unpatched.text,
                    unpatched.stats(),
                    patched.text,
                    patched.stats(),
                    merge_map.picture if merge_map is not None else None,
                    merge_map,
                    merge_map_caption(merge_map) if patched.done else "",
                )
        except ValueError as error:
            yield "", "", "", f"**Cannot run:** {error}", None, None, ""

    def ask_server(image, question):
        note = "not shown: the server runs one setting (start a second `pitome-mllm serve` to compare)"
        if not question.strip():
            yield "", note, "", "**Cannot run:** ask a question about the image first", None, None, ""
            return
        try:
            answer = ServedAnswer(model=model_name)
            for answer in client.stream_answer(image, question, max_tokens=MAX_SERVED_TOKENS):
                yield "", note, answer.text, answer.stats(), None, None, "merge maps need the model in this process"
        except ServerError as error:
            yield "", note, answer.text, f"**Server error:** {error}", None, None, ""

    def show_token(merge_map: MergeMap | None, event: gr.SelectData):
        if merge_map is None:
            return None, ""
        x, y = event.index
        try:
            token = merge_map.token_at(int(x), int(y))
        except ValueError as error:
            return merge_map.picture, str(error)
        return merge_map.render(highlight_token=token), merge_map.describe_token(token)

    with gr.Blocks(title="pitome-mllm") as app:
        gr.Markdown(
            "# pitome-mllm: PiToMe visual-token merging\n"
            f"Model: `{model_name}`. Ask about an image; the same model answers unpatched and patched "
            "with the setting below, each with its visual tokens and costs."
        )
        if local and session.random_weights:
            gr.Markdown(RANDOM_WEIGHTS_NOTE, elem_id="random-weights-note")
        image_state = gr.State(load_image(bundled[0]))
        map_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                bundled_image = gr.Dropdown(bundled, value=bundled[0], label="Bundled image", elem_id="bundled-image")
                upload = gr.File(label="…or upload an image", type="filepath", elem_id="upload")
                upload_message = gr.Markdown("", elem_id="upload-message")
                preview = gr.Image(
                    value=load_image(bundled[0]), type="pil", label="Image", interactive=False, elem_id="image"
                )
            with gr.Column(scale=1, visible=local):
                method = gr.Dropdown(list(ALL_METHODS), value="pitome", label="Method", elem_id="method")
                preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset", elem_id="preset")
                budget = gr.Radio(list(BUDGETS), value="target_tokens", label="Budget", elem_id="budget")
                value = gr.Number(value=default_target(session), label="Value", elem_id="budget-value")
            plan = gr.Markdown(
                plan_text("pitome", DEFAULT_PRESET, "target_tokens", default_target(session)), elem_id="plan"
            )
        with gr.Row():
            question = gr.Textbox(
                value="What is in this image?", label="Question", scale=4, elem_id="question", max_lines=1
            )
            ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Unpatched")
                answer_unpatched = gr.Markdown("", elem_id="answer-unpatched")
                stats_unpatched = gr.Markdown("", elem_id="stats-unpatched")
            with gr.Column():
                gr.Markdown("### Patched" if local else "### Served")
                answer_patched = gr.Markdown("", elem_id="answer-patched")
                stats_patched = gr.Markdown("", elem_id="stats-patched")
        with gr.Row():
            merge_map = gr.Image(
                label="Merge map of the patched run (each token one colour; click a patch)",
                type="numpy",
                interactive=False,
                elem_id="merge-map",
            )
            token_info = gr.Markdown("", elem_id="token-info")

        controls = [method, preset, budget, value]
        for control in controls:
            control.change(plan_text, controls, plan)
        budget.change(
            lambda kind: DEFAULT_TARGET_TOKENS[kind] if kind == "keep_ratio" else default_target(session), budget, value
        )
        bundled_image.change(pick_bundled, bundled_image, [image_state, upload_message]).then(
            lambda image: image, image_state, preview
        )
        upload.upload(take_upload, [upload, image_state], [image_state, upload_message, upload]).then(
            lambda image: image, image_state, preview
        )
        outputs = [answer_unpatched, stats_unpatched, answer_patched, stats_patched, merge_map, map_state, token_info]
        inputs = [image_state, question, *controls]
        ask_button.click(ask, inputs, outputs)
        question.submit(ask, inputs, outputs)
        merge_map.select(show_token, map_state, [merge_map, token_info])
    return app


MAX_SERVED_TOKENS = 64
UPLOAD_HARD_LIMIT_BYTES = 4 * MAX_UPLOAD_BYTES


def merge_map_caption(merge_map: MergeMap | None) -> str:
    if merge_map is None:
        return "no merge map: this method leaves no token map on one square patch grid"
    rows, cols = merge_map.labels.shape
    return f"{merge_map.num_tokens} tokens hold the {rows}x{cols} patches; click a patch to see its token's patches"


def launch(app, host: str, port: int | None, **options: Any):
    """Start ``app`` (without blocking); returns the page's local URL."""
    app.queue(default_concurrency_limit=1)
    _, local_url, _ = app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        # Gradio's own cap keeps a huge upload off the disk; uploads between MAX_UPLOAD_BYTES and this
        # reach `open_upload`, which refuses them with the page's own message.
        max_file_size=UPLOAD_HARD_LIMIT_BYTES,
        **options,
    )
    return local_url

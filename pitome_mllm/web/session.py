"""What the web page does, without the web framework: check an upload, plan a setting, answer a
question with the unpatched and the patched model (streamed, with their costs), draw the merge map.

One model is loaded once; every run patches it with the page's current setting and unpatches it
afterwards (``patch()`` only installs hooks, so a new setting costs no reload). Runs hold a lock:
the model serves one question at a time, whoever asks.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# An upload larger than this (bytes on disk) or with more pixels is refused before it is decoded:
# the model sees a 336 px image anyway, and decoding a huge file would stall the server.
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
# The merge map is drawn at least this many pixels wide, so a 112 px tiny-model image stays clickable.
MIN_MAP_PX = 336
# Patches listed for a clicked token (a random-weight model can pile hundreds into one).
MAX_PATCHES_LISTED = 24
# Colour of the patches a clicked token holds.
HIGHLIGHT_RGB = (1.0, 0.0, 0.0)


class UploadError(ValueError):
    """An upload the page refuses (not an image, too large); the message says which and why."""


# ------------------------------------------------------------------------------------------ uploads
def open_upload(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS):
    """The uploaded file as an RGB PIL image.

    Raises:
        UploadError: the file is larger than ``max_bytes``, is not an image PIL can read, or has
            more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(f"{name} is {size / 2**20:.1f} MiB; images up to {max_bytes / 2**20:.0f} MiB are accepted")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(
                    f"{name} is {width}x{height} pixels; images up to {max_pixels:,} pixels "
                    f"(e.g. {int(max_pixels**0.5)}x{int(max_pixels**0.5)}) are accepted"
                )
            return image.convert("RGB")
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as error:
        raise UploadError(f"{name} is not an image this page can read (JPEG, PNG, ...): {error}") from error


# ------------------------------------------------------------------------------------------ settings
# The page's two ways to give a budget (PiToMeConfig's fields of the same names).
BUDGETS = ("target_tokens", "keep_ratio")


@dataclass(frozen=True)
class Settings:
    """The page's merge setting: a method, a preset and one budget (``target_tokens`` or ``keep_ratio``)."""

    method: str
    preset: str
    target_tokens: int | None = None
    keep_ratio: float | None = None

    def patch_keywords(self) -> dict[str, Any]:
        """The keywords for ``pitome_mllm.patch``."""
        keywords: dict[str, Any] = {"method": self.method, "preset": self.preset}
        if self.target_tokens is not None:
            keywords["target_tokens"] = self.target_tokens
        if self.keep_ratio is not None:
            keywords["keep_ratio"] = self.keep_ratio
        return keywords

    def describe(self) -> str:
        budget = f"target_tokens={self.target_tokens}" if self.target_tokens is not None else ""
        budget = budget or f"keep_ratio={self.keep_ratio}"
        return f"{self.method}, {self.preset} preset, {budget}"


def settings_from_page(method: str, preset: str, budget: str, value: float | None) -> Settings:
    """`Settings` from the page's controls; ``budget`` is ``"target_tokens"`` or ``"keep_ratio"``.

    Raises:
        ValueError: an unknown budget kind, a missing value, or a non-integer token count.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if value is None:
        raise ValueError(f"{budget} needs a value")
    if budget == "target_tokens":
        if float(value) != int(value):
            raise ValueError(f"target_tokens must be a whole number, got {value}")
        return Settings(method, preset, target_tokens=int(value))
    return Settings(method, preset, keep_ratio=float(value))


@dataclass(frozen=True)
class Plan:
    """What a setting gives, known before the model runs."""

    num_visual_tokens: int
    unpatched_tokens: int
    tokens_after_layer: list[int]
    keep_ratio: float

    def describe(self) -> str:
        steps = _distinct_steps(self.tokens_after_layer)
        schedule = " → ".join(str(count) for count in steps) if steps else "no tower merging"
        return (
            f"**{self.num_visual_tokens}** visual tokens per image reach the language model "
            f"(unpatched: {self.unpatched_tokens}); tower keep ratio {self.keep_ratio:.3f}; "
            f"tokens through the vision layers: {schedule}"
        )


def _distinct_steps(counts: list[int]) -> list[int]:
    """``counts`` with repeats of the previous value left out (the layers that change the count)."""
    return [count for index, count in enumerate(counts) if index == 0 or count != counts[index - 1]]


# ------------------------------------------------------------------------------------------ results
@dataclass
class Answer:
    """One side of the comparison, as it streams: the text so far and, once done, its costs."""

    label: str
    text: str = ""
    done: bool = False
    visual_tokens: int | None = None
    vision_s: float | None = None
    prefill_s: float | None = None
    total_s: float | None = None
    output_tokens: int | None = None
    kv_cache_bytes: int | None = None
    error: str | None = None

    def stats(self) -> str:
        """One Markdown line of costs (empty while the answer streams)."""
        if self.error:
            return f"error: {self.error}"
        if not self.done:
            return "answering…" if self.text or self.visual_tokens is not None else ""
        parts = [f"**{self.visual_tokens}** visual tokens"]
        if self.vision_s is not None:
            parts.append(f"vision {self.vision_s * 1e3:.0f} ms")
            parts.append(f"prefill {(self.prefill_s - self.vision_s) * 1e3:.0f} ms")
        if self.prefill_s is not None:
            parts.append(f"first token {self.prefill_s * 1e3:.0f} ms")
        if self.total_s is not None:
            parts.append(f"total {self.total_s:.2f} s ({self.output_tokens} tokens)")
        if self.kv_cache_bytes is not None:
            parts.append(f"KV cache {format_bytes(self.kv_cache_bytes)}")
        return " · ".join(parts)


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


@dataclass
class MergeMap:
    """Which LLM token holds each patch of the image the model saw.

    Attributes:
        image: ``[H, W, 3]`` floats in [0, 1], the model's view of the image (after its resize / crop).
        labels: ``[rows, cols]`` the token holding each patch.
    """

    image: np.ndarray
    labels: np.ndarray
    picture: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.picture = self.render()

    @property
    def num_tokens(self) -> int:
        return len(np.unique(self.labels))

    def render(self, highlight_token: int | None = None) -> np.ndarray:
        """``[H', W', 3]`` uint8: each group one colour over the image; ``highlight_token``'s patches in red."""
        from ..tools.viz import render_merge_map

        scale = max(1, -(-MIN_MAP_PX // self.image.shape[1]))
        image = np.repeat(np.repeat(self.image, scale, axis=0), scale, axis=1)
        picture = render_merge_map(image, self.labels, colour="palette")
        if highlight_token is not None:
            rows, cols = self.labels.shape
            cell_h, cell_w = picture.shape[0] // rows, picture.shape[1] // cols
            held = np.repeat(np.repeat(self.labels == highlight_token, cell_h, axis=0), cell_w, axis=1)
            picture[held] = 0.5 * picture[held] + 0.5 * np.array(HIGHLIGHT_RGB)
        return (picture * 255).round().astype(np.uint8)

    def token_at(self, x: int, y: int) -> int:
        """The token holding the patch under pixel ``(x, y)`` of the rendered picture.

        Raises:
            ValueError: the point is outside the picture.
        """
        height, width = self.picture.shape[:2]
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point ({x}, {y}) is outside the {width}x{height} merge map")
        rows, cols = self.labels.shape
        return int(self.labels[y * rows // height, x * cols // width])

    def describe_token(self, token: int, shown: int = MAX_PATCHES_LISTED) -> str:
        """Which patches ``token`` holds, as ``(row, col)`` of the patch grid (the first ``shown`` of them)."""
        rows, cols = np.nonzero(self.labels == token)
        cells = [f"({r}, {c})" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
        listed = ", ".join(cells[:shown]) + (f", … ({len(cells) - shown} more)" if len(cells) > shown else "")
        return f"token {token} holds {len(cells)} patch{'es' if len(cells) != 1 else ''}: {listed}"


# ------------------------------------------------------------------------------------------ session
class _QueueWriter(io.TextIOBase):
    """A writable that hands each piece of streamed text to a queue (read by the page's generator)."""

    def __init__(self, pieces: queue.Queue) -> None:
        self._pieces = pieces

    def write(self, text: str) -> int:
        self._pieces.put(text)
        return len(text)


_DONE = object()


class DemoSession:
    """One loaded model and processor that the page patches per question.

    Args:
        model, processor: an unpatched LLaVA model (eval mode) and its processor.
        random_weights: the model has random weights (the tiny model): its answers mean nothing.
        max_new_tokens: the answer length limit.
    """

    def __init__(self, model, processor, *, random_weights: bool, max_new_tokens: int = 48) -> None:
        from ..models import model_geometry

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.processor = processor
        self.random_weights = random_weights
        self.max_new_tokens = max_new_tokens
        self.unpatched_tokens = model_geometry(model).native_visual_tokens
        self._lock = threading.Lock()

    # -------------------------------------------------------------------- planning
    def plan(self, settings: Settings) -> Plan:
        """The token counts of ``settings`` (patches and unpatches at once; the model does not run).

        Raises:
            ValueError: the setting is invalid (PiToMeConfig's own message) or the model cannot use it.
        """
        from .. import patch

        with self._lock:
            handle = patch(self.model, self.processor, **settings.patch_keywords())
            try:
                return Plan(
                    num_visual_tokens=handle.num_visual_tokens,
                    unpatched_tokens=self.unpatched_tokens,
                    tokens_after_layer=[step.tokens_out for step in handle.schedule],
                    keep_ratio=handle.keep_ratio,
                )
            finally:
                handle.unpatch()

    # -------------------------------------------------------------------- answering
    def compare(self, image, question: str, settings: Settings) -> Iterator[tuple[Answer, Answer, MergeMap | None]]:
        """Answer ``question`` about ``image`` unpatched, then patched with ``settings``, streaming.

        Yields ``(unpatched, patched, merge map or None)`` after every streamed piece; the merge map
        comes with the patched answer's end. The setting is checked before anything runs.

        Raises:
            ValueError: an empty question or an invalid setting.
        """
        from .. import patch

        question = question.strip()
        if not question:
            raise ValueError("ask a question about the image first")
        unpatched, patched = Answer("unpatched"), Answer(f"patched: {settings.describe()}")
        with self._lock:
            yield from self._stream(image, question, unpatched, lambda: (unpatched, patched, None))
            handle = patch(self.model, self.processor, **settings.patch_keywords())
            try:
                patched.visual_tokens = handle.num_visual_tokens
                yield from self._stream(image, question, patched, lambda: (unpatched, patched, None))
                merge_map = self._merge_map(handle, image)
            finally:
                handle.unpatch()
        yield unpatched, patched, merge_map

    def _stream(self, image, question: str, answer: Answer, snapshot) -> Iterator:
        """Run one greedy answer into ``answer``, yielding ``snapshot()`` after each piece of text."""
        from ..runtime.loading import build_prompt, count_image_tokens
        from ..runtime.streaming import stream_turn

        prompt = build_prompt(self.processor, question)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.model.device)
        prompt_length = int(inputs["input_ids"].shape[1])
        answer.visual_tokens = count_image_tokens(self.processor, inputs["input_ids"])
        pieces: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["stats"] = stream_turn(
                    self.model,
                    self.processor.tokenizer,
                    _QueueWriter(pieces),
                    lambda timer: answer.visual_tokens,
                    prompt_length=prompt_length,
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                )[1]
            except Exception as error:  # shown on the page; the server keeps serving
                outcome["error"] = error
            finally:
                pieces.put(_DONE)

        worker = threading.Thread(target=run, name="pitome-mllm-web-answer", daemon=True)
        worker.start()
        try:
            yield snapshot()
            while (piece := pieces.get()) is not _DONE:
                answer.text += piece
                yield snapshot()
        finally:
            # A page that goes away closes this generator: the model is released (and unpatched)
            # only once its generate() has ended.
            worker.join()
        answer.text = answer.text.strip()
        if "error" in outcome:
            answer.error = f"{type(outcome['error']).__name__}: {outcome['error']}"
        else:
            stats = outcome["stats"]
            answer.vision_s, answer.prefill_s, answer.total_s = stats.vision_s, stats.prefill_s, stats.total_s
            answer.output_tokens = stats.output_tokens
            answer.kv_cache_bytes = self.kv_cache_bytes(prompt_length)
        answer.done = True
        yield snapshot()

    def kv_cache_bytes(self, num_tokens: int) -> int | None:
        """Bytes of keys and values the language model keeps for ``num_tokens`` tokens (None: sizes unknown)."""
        from ..models import model_parts

        parts = model_parts(self.model)
        if parts.decoder is None or parts.output_head is None:
            return None
        decoder = parts.decoder
        itemsize = next(parts.output_head.parameters()).element_size()
        return 2 * num_tokens * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * itemsize

    def _merge_map(self, handle, image) -> MergeMap | None:
        """The merge map of the run that just ended (None where the method leaves no token map)."""
        from ..tools.viz import displayable, pixel_values_for

        token_map = handle.final_token_map
        if token_map is None:
            return None
        labels = token_map[0].cpu().numpy()
        side = int(round(len(labels) ** 0.5))
        if side * side != len(labels):
            return None  # not one square grid (anyres crops): no single picture to draw on
        picture = displayable(pixel_values_for(self.processor, image), self.processor)
        if picture.shape[0] % side or picture.shape[1] % side:
            return None
        return MergeMap(picture, labels.reshape(side, side))

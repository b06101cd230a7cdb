"""A small client for a running ``pitome-mllm serve`` (vLLM's OpenAI-compatible API), standard library only.

The page sends the image inline (a ``data:`` URL) with the question and streams the answer
(``"stream": true``, server-sent events); the server's own setting decides the merging, so the page
shows what the server reports: the answer, the time to its first piece, and the prompt's token count.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


class ServerError(RuntimeError):
    """The server could not be reached or answered something other than the OpenAI API."""


def normalize_base_url(url: str) -> str:
    """``http://host:port`` (or ``.../v1``) -> ``http://host:port/v1``.

    Raises:
        ValueError: not an http(s) URL with a host.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--serve-url must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def image_data_url(image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class ServedAnswer:
    """The streamed answer so far and, once done, what the server reported about it."""

    model: str
    text: str = ""
    done: bool = False
    first_piece_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def stats(self) -> str:
        if not self.done:
            return "answering…" if self.text else ""
        parts = [f"served by {self.model}"]
        if self.prompt_tokens is not None:
            parts.append(f"**{self.prompt_tokens}** prompt tokens (visual tokens included)")
        if self.first_piece_s is not None:
            parts.append(f"first token {self.first_piece_s * 1e3:.0f} ms")
        if self.total_s is not None:
            parts.append(f"total {self.total_s:.2f} s ({self.completion_tokens} tokens)")
        return " · ".join(parts)


class OpenAIClient:
    """Chat completions against one OpenAI-compatible server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added when missing).
        timeout_s: how long to wait for a connection or the next piece of the answer.
    """

    def __init__(self, url: str, timeout_s: float = 120.0) -> None:
        self.base_url = normalize_base_url(url)
        self.timeout_s = timeout_s

    def _open(self, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:300]
            raise ServerError(f"{self.base_url}{path} answered HTTP {error.code}: {detail}") from error
        except (urllib.error.URLError, OSError) as error:
            raise ServerError(f"cannot reach {self.base_url}{path}: {error}") from error

    def model_name(self) -> str:
        """The id of the (first) model the server serves."""
        with self._open("/models") as response:
            listing = json.load(response)
        models = listing.get("data") or []
        if not models:
            raise ServerError(f"{self.base_url}/models lists no model: {listing!r}")
        return str(models[0]["id"])

    def stream_answer(self, image, question: str, max_tokens: int) -> Iterator[ServedAnswer]:
        """Ask ``question`` about ``image`` (greedy); yields the answer after every streamed piece.

        Raises:
            ServerError: the server is unreachable, refuses the request, or streams something unreadable.
        """
        answer = ServedAnswer(model=self.model_name())
        payload = {
            "model": answer.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        began = time.perf_counter()
        with self._open("/chat/completions", payload) as response:
            for event in server_sent_events(response):
                if event.get("error"):
                    raise ServerError(f"the server stopped the answer: {event['error']}")
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        if answer.first_piece_s is None:
                            answer.first_piece_s = time.perf_counter() - began
                        answer.text += piece
                        yield answer
                usage = event.get("usage")
                if usage:
                    answer.prompt_tokens = usage.get("prompt_tokens")
                    answer.completion_tokens = usage.get("completion_tokens")
        answer.total_s = time.perf_counter() - began
        answer.text = answer.text.strip()
        answer.done = True
        yield answer


def server_sent_events(lines) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream (``data: {...}`` lines) up to ``data: [DONE]``.

    Raises:
        ServerError: a ``data:`` line that is not JSON.
    """
    for raw in lines:
        line = raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw.strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ..."), event names
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError as error:
            raise ServerError(f"the server streamed a line that is not JSON: {data[:200]!r}") from error

"""A fake OpenAI-compatible server on loopback, answering the way ``pitome-mllm serve`` (vLLM) does:
``/v1/models`` and a streamed ``/v1/chat/completions``; for the web page's client without vLLM."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_MODEL = "llava-tiny"
FAKE_ANSWER = ("A ", "cat ", "sits.")
FAKE_PROMPT_TOKENS = 75


class FakeOpenAIServer(BaseHTTPRequestHandler):
    """``/v1/models`` and a streamed ``/v1/chat/completions`` the way vLLM answers them."""

    requests: list[dict] = []  # the JSON bodies of the chat requests, oldest first
    fail = False  # True: refuse chat requests with HTTP 400

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        assert self.path == "/v1/models", self.path
        self._send(200, json.dumps({"data": [{"id": FAKE_MODEL}]}).encode(), "application/json")

    def do_POST(self) -> None:
        assert self.path == "/v1/chat/completions"
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(payload)
        if type(self).fail:
            self._send(400, b'{"error": "image too large"}', "application/json")
            return
        events = [{"choices": [{"delta": {"content": piece}}]} for piece in FAKE_ANSWER]
        events.append(
            {"choices": [], "usage": {"prompt_tokens": FAKE_PROMPT_TOKENS, "completion_tokens": len(FAKE_ANSWER)}}
        )
        body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        self._send(200, body.encode(), "text/event-stream")


@contextlib.contextmanager
def serve_fake_openai() -> Iterator[str]:
    """Run `FakeOpenAIServer` on a free loopback port; yields its base URL (``http://127.0.0.1:PORT``)."""
    FakeOpenAIServer.requests = []
    FakeOpenAIServer.fail = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAIServer)
    thread = threading.Thread(target=server.serve_forever, name="fake-openai-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

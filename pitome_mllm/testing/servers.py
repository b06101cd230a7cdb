"""Local servers in tests and benchmarks: a free loopback port, and waiting until a started server is healthy."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(log: Path, characters: int = 4000) -> str:
    return log.read_text(errors="replace")[-characters:] if log.is_file() else "(no log)"


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, deadline: float) -> None:
    """Return once ``{url}/health`` answers 200; ``deadline`` is a `time.monotonic` time.

    Raises:
        RuntimeError: the process exited first, or the deadline passed; with the end of its ``log``.
    """
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"no healthy server at {url} by the deadline:\n{log_tail(log)}")

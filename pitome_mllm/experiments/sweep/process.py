"""What keeps a sweep's processes and folder sane: the lmms-eval child dies with the sweep, one
sweep owns a folder at a time, and a failing setup stops the sweep instead of failing every run.

* `run_child` starts lmms-eval under `supervisor.py` in its own session (so a terminal's Ctrl-C
  reaches only the sweep, which then ends the run). The supervisor ends the launcher's whole
  process tree, workers in their own process groups included (``torchrun``, an ``sh -c``
  wrapper), when the launcher exits, when the sweep ends the run, and when the sweep dies
  however it dies (``kill -9`` included): otherwise a worker would keep writing into a run
  folder that the resumed sweep has just reset.
* `SweepLock` is an ``flock`` on ``OUTPUT/.sweep.lock`` holding the owner's pid. The kernel
  drops the lock when its owner dies however it dies, so a lock left by a killed sweep is
  recognised as stale (the file still names a pid, but nobody holds it) and taken over.
* `failure_signature` / `repeated_failure` recognise runs that fail the same way before
  lmms-eval evaluated anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .schema import SuiteError, refuse_link

logger = logging.getLogger("pitome_mllm")

LOCK_FILE = ".sweep.lock"
# How long lmms-eval gets to exit after SIGTERM before the group is killed.
TERMINATE_GRACE_S = 10.0
# Runs in a row failing the same way before anything was evaluated: the setup, not the run, is broken.
REPEATED_FAILURES = 3
LOG_TAIL_LINES = 15
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)|Killed)\b.*")


class SweepLocked(RuntimeError):
    """Another live sweep owns the folder."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; carries what the sweep had done by then."""

    def __init__(self, outcome: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.outcome = outcome or {}


# ------------------------------------------------------------------------------- the child
SUPERVISOR = Path(__file__).with_name("supervisor.py")


def kill_group(process: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def supervised(command: Sequence[str], watch_fd: int, grace_s: float = TERMINATE_GRACE_S / 2) -> list[str]:
    """``command`` run under `supervisor.py`, which watches ``watch_fd`` for the sweep's death.

    The supervisor gets half the sweep's grace, so that its own SIGKILL round ends the tree before
    the sweep's SIGKILL would end the supervisor.
    """
    return [sys.executable, "-I", str(SUPERVISOR), str(watch_fd), f"{grace_s:g}", "--", *command]


def run_child(command: Sequence[str], log: IO[str], on_start: Callable[[int], None] = lambda pid: None) -> int:
    """Run ``command`` with output to ``log``, its whole process tree bound to the sweep; its exit status.

    Whatever ends the wait (an exception, Ctrl-C) ends the child's whole tree as well. The sweep
    keeps the write end of a pipe whose read end only the supervisor holds: when the sweep dies,
    the kernel closes it and the supervisor ends the tree.
    """
    watch_read, watch_write = os.pipe()  # both ends close-on-exec: no other child inherits them
    try:
        process = subprocess.Popen(
            supervised(command, watch_read),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(watch_read,),
        )
    except BaseException:
        os.close(watch_write)
        raise
    finally:
        os.close(watch_read)
    try:
        on_start(process.pid)
        return process.wait()
    finally:
        if process.poll() is None:
            kill_group(process)
        os.close(watch_write)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let ``kill PID`` unwind like Ctrl-C, so children are ended and finished runs reported."""

    def interrupt(signum, frame):
        raise SweepInterrupted()

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -------------------------------------------------------------------------------- the lock
def describe_owner(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{when}"


class SweepLock:
    """Exclusive ownership of a sweep folder by this process (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None
        self.previous: dict[str, Any] = {}  # what a dead owner left, if anything
        self.state: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        os.lseek(self.fd, 0, os.SEEK_SET)
        text = os.read(self.fd, 65536).decode(errors="replace").strip()
        try:
            owner = json.loads(text) if text else {}
        except json.JSONDecodeError:
            owner = {"pid": "?", "note": text[:80]}
        return owner if isinstance(owner, dict) else {}

    def _write(self, state: dict[str, Any]) -> None:
        payload = (json.dumps(state) + "\n").encode() if state else b""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, payload, 0)
        self.state = state

    def __enter__(self) -> SweepLock:
        import fcntl

        refuse_link(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            raise SuiteError(f"cannot open the sweep lock {self.path}: {error.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read()
            os.close(self.fd)
            self.fd = None
            raise SweepLocked(
                f"{self.path.parent} is in use by another sweep ({describe_owner(owner)}); "
                "wait for it to finish or use another --output"
            ) from None
        self.previous = self._read()
        if self.previous:
            # Nobody holds the lock, yet the file names an owner: that sweep died without unlocking.
            logger.warning(
                "taking over %s: the sweep that held it (%s) ended without releasing it; resuming its runs",
                self.path,
                describe_owner(self.previous),
            )
        self._write({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "child": None})
        return self

    def set_child(self, pid: int | None) -> None:
        """Record the running lmms-eval child, for whoever looks at the folder."""
        self._write({**self.state, "child": pid})

    def __exit__(self, *exc_info) -> None:
        if self.fd is None:
            return
        # Emptied, not deleted: deleting would let a waiting sweep lock a file nobody else sees.
        self._write({})
        os.close(self.fd)  # releases the flock
        self.fd = None


# ---------------------------------------------------------------------------- fail fast
def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last non-empty lines of a run's log (empty if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def failure_signature(tail: list[str]) -> str:
    """The line saying why a run failed: its last exception line, else its last line."""
    for line in reversed(tail):
        if _EXCEPTION_LINE.match(line):
            return line.strip()
    return tail[-1].strip() if tail else "(empty log)"


def repeated_failure(signatures: list[str | None], count: int = REPEATED_FAILURES) -> str | None:
    """The signature shared by the last ``count`` attempts, if they all failed early the same way.

    ``signatures`` holds one entry per attempted run, in order: None for a run that succeeded
    or got as far as evaluating, else its `failure_signature`.
    """
    last = signatures[-count:]
    if len(last) == count and last[0] is not None and all(signature == last[0] for signature in last):
        return last[0]
    return None

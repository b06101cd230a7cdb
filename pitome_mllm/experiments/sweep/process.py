"""What keeps a sweep's processes and folder sane: the lmms-eval child dies with the sweep, one
sweep owns a folder at a time, and a failing setup stops the sweep instead of failing every run.

* `run_child` starts lmms-eval in its own process group (so a terminal's Ctrl-C reaches only the
  sweep, which then ends the whole group) with a parent-death signal (Linux ``prctl``), so even a
  SIGKILL of the sweep takes the child with it: otherwise it would keep writing into a run
  folder that the resumed sweep has just reset.
* `SweepLock` is an ``flock`` on ``OUTPUT/.sweep.lock`` holding the owner's pid. The kernel
  drops the lock when its owner dies however it dies, so a lock left by a killed sweep is
  recognised as stale (the file still names a pid, but nobody holds it) and taken over.
* `failure_signature` / `repeated_failure` recognise runs that fail the same way before
  lmms-eval evaluated anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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

logger = logging.getLogger("pitome_mllm")

LOCK_FILE = ".sweep.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
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
def _parent_death_setter() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when the sweep dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded here, in the parent: a forked child should do as little as possible before exec.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The sweep may have died between fork and prctl: then nobody would send the signal.
        if os.getppid() != parent:
            os._exit(1)

    return set_parent_death_signal


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


def run_child(command: Sequence[str], log: IO[str], on_start: Callable[[int], None] = lambda pid: None) -> int:
    """Run ``command`` with output to ``log`` in its own process group; its exit status.

    Whatever ends the wait (an exception, Ctrl-C) ends the child's whole group as well.
    """
    process = subprocess.Popen(
        list(command),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_parent_death_setter(),
    )
    try:
        on_start(process.pid)
        return process.wait()
    finally:
        if process.poll() is None:
            kill_group(process)


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

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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

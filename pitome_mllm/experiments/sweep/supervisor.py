"""Runs one lmms-eval launcher and ends its whole process tree with it, or with the sweep.

The sweep starts this file as a script (``python -I supervisor.py WATCH_FD GRACE_S -- COMMAND ...``),
not as a package module, so it starts in milliseconds and imports only the standard library.

A launcher may fork (``torchrun``, ``accelerate launch``, an ``sh -c`` wrapper) and its workers may
start their own process groups, so neither a parent-death signal (it reaches the direct child only)
nor a kill of one group reaches them all. Here:

* this process becomes a child subreaper (Linux ``prctl``): a worker whose parent dies is re-parented
  to it rather than to init, so every process the launcher started stays among its descendants;
* it reads ``WATCH_FD``, a pipe whose other end only the sweep holds: end of file means the sweep is
  gone, however it died (``kill -9`` included);
* when the sweep is gone, on SIGTERM / SIGINT / SIGHUP (the sweep ending the run), and after the
  launcher exits, every descendant gets SIGTERM, and SIGKILL after ``GRACE_S``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
POLL_S = 0.2
KILL_WAIT_S = 5.0


def become_subreaper() -> bool:
    """Ask the kernel to re-parent orphaned descendants to this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def parents_of_processes() -> dict[int, tuple[int, str]] | None:
    """``{pid: (parent pid, state)}`` of every process in ``/proc``; None where there is no ``/proc``."""
    if not os.path.isdir("/proc/self"):
        return None
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (name) state ppid ...": the name may hold spaces and parentheses.
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def living_descendants(root: int) -> list[int] | None:
    """Descendants of ``root`` that are not zombies; None where they cannot be listed."""
    table = parents_of_processes()
    if table is None:
        return None
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        for pid in children.get(frontier.pop(), []):
            if table[pid][1] != "Z":
                found.append(pid)
            frontier.append(pid)
    return found


def reap_orphans(launcher: subprocess.Popen) -> None:
    """Collect exited re-parented workers (never the launcher: `subprocess` reads its status)."""
    me = os.getpid()
    for pid, (parent, state) in (parents_of_processes() or {}).items():
        if parent == me and state == "Z" and pid != launcher.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def end_tree(launcher: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM every descendant, SIGKILL what is left after ``grace_s``."""
    me = os.getpid()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        pids = living_descendants(me)
        if pids is None:  # no /proc: the launcher's group is the best we can reach
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=wait_s)
            continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            launcher.poll()
            reap_orphans(launcher)
            if not living_descendants(me):
                return
            time.sleep(0.05)


def exit_status(returncode: int | None) -> int:
    """The launcher's status as an exit code (a signal N as 128 + N, as shells report it)."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str]) -> int:
    watch_fd, grace_s, separator, *command = argv
    if separator != "--" or not command:
        print("usage: supervisor.py WATCH_FD GRACE_S -- COMMAND ...", file=sys.stderr)
        return 2
    watch_fd, grace_s = int(watch_fd), float(grace_s)
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    become_subreaper()
    # Its own process group, so that the no-/proc fallback can signal the launcher's group.
    launcher = subprocess.Popen(command, preexec_fn=os.setpgrp)
    try:
        while launcher.poll() is None and not stopped:
            readable, _, _ = select.select([watch_fd], [], [], POLL_S)
            if readable and not os.read(watch_fd, 1):
                break  # end of file: the sweep is gone
    finally:
        end_tree(launcher, grace_s)
    return exit_status(launcher.poll())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Command-line output and input shared by the subcommands.

* `render_table`: a plain-text table that never cuts a cell. When it is wider than the
  terminal it is split into column blocks that each repeat the key column, so an 80-column
  terminal reads every number; piped into a file or ``| cat`` it keeps one block (a log has no
  width), unless ``COLUMNS`` asks for one.
* `ListAction`: every list option accepts ``64,128``, ``64 128`` and ``64, 128`` alike.
* `busy_machine_warning`: timings taken while other processes want the same cores are not
  worth comparing; say so before measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

logger = logging.getLogger("pitome_mllm")

GAP = "  "


def plural(count: int, noun: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ----------------------------------------------------------------------------------- tables
def output_width(stream: TextIO | None = None) -> int | None:
    """Columns a table must fit: ``$COLUMNS``, else the terminal's; None (no limit) when piped."""
    stream = stream or sys.stdout
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if hasattr(stream, "isatty") and stream.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return None


def _column_width(header: str, cells: Sequence[str]) -> int:
    # Headers wrap at spaces, so a column needs only its longest cell or header word.
    return max([len(word) for word in header.split()] + [len(cell) for cell in cells] + [1])


def column_blocks(widths: Sequence[int], width: int | None, keys: int = 1) -> list[list[int]]:
    """Column indices of each block: the first ``keys`` columns in every block, the rest in order,
    as many per block as fit in ``width`` (at least one, however narrow the terminal)."""
    if width is None:
        return [list(range(len(widths)))]
    key_width = sum(widths[:keys]) + len(GAP) * keys
    blocks: list[list[int]] = []
    current: list[int] = []
    used = key_width
    for index in range(keys, len(widths)):
        if current and used + widths[index] > width:
            blocks.append(list(range(keys)) + current)
            current, used = [], key_width
        current.append(index)
        used += widths[index] + len(GAP)
    if current or not blocks:
        blocks.append(list(range(keys)) + current)
    return blocks


def render_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str = "", width: int | None = None, keys: int = 1
) -> str:
    """``rows`` under ``columns``: the key columns left-aligned, the others right-aligned."""
    widths = [_column_width(column, [row[index] for row in rows]) for index, column in enumerate(columns)]
    parts = []
    if title:
        parts.append("\n".join(textwrap.wrap(title, width)) if width else title)
    for block in column_blocks(widths, width, keys):
        headers = [textwrap.wrap(columns[index], widths[index]) or [""] for index in block]
        depth = max(len(lines) for lines in headers)
        lines = []
        for line in range(depth):
            cells = []
            for index, wrapped in zip(block, headers, strict=True):
                text = wrapped[line - depth + len(wrapped)] if line >= depth - len(wrapped) else ""
                cells.append(_align(text, widths[index], index < keys))
            lines.append(GAP.join(cells).rstrip())
        lines.append(GAP.join("-" * widths[index] for index in block))
        for row in rows:
            lines.append(GAP.join(_align(row[index], widths[index], index < keys) for index in block).rstrip())
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _align(text: str, width: int, left: bool) -> str:
    return text.ljust(width) if left else text.rjust(width)


# ------------------------------------------------------------------------------------ lists
class ListAction(argparse.Action):
    """``nargs="+"`` that also splits each word on commas: ``--budgets 64,128``, ``--budgets 64 128``."""

    def __init__(self, option_strings, dest, convert: Callable[[str], Any] = str, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        kwargs.setdefault("metavar", dest.upper()[:-1] if dest.endswith("s") else dest.upper())
        self.convert = convert
        self.allowed = kwargs.pop("choices", None)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        words = [values] if isinstance(values, str) else list(values)
        items = [item.strip() for word in words for item in word.split(",") if item.strip()]
        if not items and self.nargs == "+":
            raise argparse.ArgumentError(self, "expected at least one value")
        try:
            converted = [self.convert(item) for item in items]
        except ValueError:
            kind = getattr(self.convert, "__name__", "value")
            raise argparse.ArgumentError(self, f"expected {kind}s separated by spaces or commas, got {words}") from None
        if self.allowed is not None:
            bad = [item for item in converted if item not in self.allowed]
            if bad:
                raise argparse.ArgumentError(self, f"invalid choice(s) {bad}; choose from {list(self.allowed)}")
        setattr(namespace, self.dest, converted)


def add_list_argument(parser, flag: str, convert: Callable[[str], Any] = str, **kwargs) -> argparse.Action:
    """``parser.add_argument(flag, ...)`` taking a list written with spaces or commas."""
    kwargs["help"] = (kwargs.get("help") or "").rstrip() + " (values separated by spaces)"
    return parser.add_argument(flag, action=ListAction, convert=convert, **kwargs)


# ----------------------------------------------------------------------------------- timing
def busy_machine_warning(threads: int, load_average: float | None = None, cpus: int | None = None) -> str | None:
    """A warning when the 1-minute load average leaves fewer idle cores than ``threads``.

    Measured before the timed work starts, so the load is the other processes'; threads that
    wait for a core measure the queue, not the model (on a busy machine the merged runs can even
    come out slower than the unpatched one).
    """
    if load_average is None:
        try:
            load_average = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on this platform
            return None
    cpus = cpus or os.cpu_count() or 1
    idle = cpus - load_average
    # Busy: other processes want at least half a core of those this run uses (a load of 0.1 on an
    # otherwise idle machine is the shell and the kernel, not competition).
    if idle >= threads - 0.5:
        return None
    advice = "wait for an idle machine" + (f" or pass --threads {max(1, int(idle))}" if threads > 1 else "")
    return (
        f"the machine is busy (load average {load_average:.1f} on {cpus} cores, {max(idle, 0):.1f} idle) "
        f"and this run uses {plural(threads, 'thread')}: timings will be noisy and may "
        f"misorder the settings; {advice}"
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per core)"
    )


def warn_if_busy() -> None:
    """Log `busy_machine_warning` for torch's thread count, if the machine is busy.

    Called right before the timed work starts (after the model is built and the settings are
    checked), so the warning never comes before an error that has nothing to do with timing.
    """
    import torch

    warning = busy_machine_warning(torch.get_num_threads())
    if warning:
        logger.warning("%s", warning)


def load_average_note() -> str:
    """``load average 2.3 on 2 cores (1 min)``: printed beside timings, so a reader can weigh them."""
    try:
        load_average = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return "load average unknown"
    return f"load average {load_average:.1f} on {plural(os.cpu_count() or 1, 'core')} (1 min)"


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch threads (None: torch's choice), restored afterwards
    (callers of ``main()``, such as tests, keep their setting). `warn_if_busy` says when the machine
    is busy; the block calls it where its timing starts."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

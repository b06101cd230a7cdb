"""README and docs as written: every ``pitome-mllm`` command line they show parses with the CLI's own parser.

Read from the files themselves: README's command table (placeholders such as ``PATH_OR_ID`` filled in,
``[optional]`` parts checked for their flags only) and every ``pitome-mllm ...`` line of a fenced shell
block in README.md and docs/*.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pitome_mllm.cli import COMMANDS, build_parser, split_passthrough

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PROGRAM = "pitome-mllm"

# The Python example builds and runs a tiny LLaVA: in every environment of the transformers matrix.
pytestmark = pytest.mark.model_facing

# What the command table's placeholders stand for, so that its rows parse as commands.
PLACEHOLDER_VALUES = {
    "PATH_OR_ID": "tiny",
    "IMG": "astronaut",
    "R": "0.9",
    "K": "64",
    "N": "7860",
    "URL": "http://127.0.0.1:8000",
    "DIR": "results",
    "MODEL": "tiny",
    "…": "tiny",
}


# ------------------------------------------------------------------------------ reading the files
def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    """The bodies of the fenced code blocks in ``text`` whose language is one of ``languages``."""
    pattern = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [match.group(2) for match in pattern.finditer(text) if match.group(1) in languages]


def shell_lines(block: str) -> list[str]:
    """The logical lines of a shell block (``\\`` continuations joined)."""
    return block.replace("\\\n", " ").splitlines()


def program_commands(line: str) -> list[list[str]]:
    """Each ``pitome-mllm`` invocation on a shell line, as its words after the program name.

    The program may carry a path (``.venv/bin/pitome-mllm``) or environment assignments; commands
    are cut at ``&&``, ``||``, ``;`` and ``|``.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = []
    current: list[str] | None = None
    for word in lexer:
        if word in ("&&", "||", ";", "|", "&"):
            current = None
        elif current is not None:
            current.append(word)
        elif Path(word).name == PROGRAM:
            current = []
            commands.append(current)
    return commands


def doc_commands() -> list[tuple[str, list[str]]]:
    """``(where, words)`` of every ``pitome-mllm`` command in README's and docs' shell blocks."""
    found = []
    for path in [README, *DOCS]:
        for block in fenced_blocks(path.read_text(), ("bash", "sh", "shell", "console")):
            for line in shell_lines(block):
                if PROGRAM not in line:
                    continue
                for words in program_commands(line):
                    found.append((f"{path.name}: {line.strip()}", words))
    return found


def command_table_rows() -> list[str]:
    """The first cell of each row of README's command table, unquoted (``pitome-mllm ...``)."""
    text = README.read_text()
    table = text[text.index("| command | needs |") :].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cell = re.match(r"\|\s*`([^`]*)`", line)
        assert cell, f"command table row without a command: {line}"
        rows.append(cell.group(1).replace("\\|", "|"))
    return rows


def concrete_command(cell: str) -> list[str]:
    """A table cell as one command: ``[optional]`` parts dropped, the first of ``a | b``, placeholders filled."""
    required = re.sub(r"\[[^\]]*\]", " ", cell).split("|")[0]
    words = shlex.split(required)
    assert words[0] == PROGRAM, cell
    return [PLACEHOLDER_VALUES.get(word, word) for word in words[1:]]


# ------------------------------------------------------------------------------ the parser
def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option a (sub)command takes, nested subcommands' included."""
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= option_strings(sub)
    return options


def command_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser([command])
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command]


def parse_command(words: list[str], where: str) -> argparse.Namespace:
    """``words`` parsed by ``pitome-mllm``'s parser, then checked by the command's own argument check."""
    import importlib

    words, passthrough = split_passthrough(words)
    assert words and words[0] in COMMANDS, f"{where}: unknown command {words[:1]}; known: {', '.join(COMMANDS)}"
    parser = build_parser([words[0]])
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            args = parser.parse_args(words)
    except SystemExit:
        pytest.fail(f"{where}: does not parse: {message.getvalue().strip().splitlines()[-1]}")
    module = importlib.import_module(COMMANDS[words[0]])
    check = getattr(module, "check_arguments", None)
    if check is not None:
        check(args)
    return args


# ------------------------------------------------------------------------------ tests
def test_the_command_table_lists_every_command():
    listed = {shlex.split(row)[1] for row in command_table_rows()}
    assert listed == set(COMMANDS)


@pytest.mark.parametrize("cell", command_table_rows())
def test_every_flag_of_the_command_table_exists(cell):
    command = shlex.split(cell.replace("|", " "))[1]
    assert command in COMMANDS, f"{cell}: no command {command!r}"
    known = option_strings(command_parser(command))
    flags = [word for word in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cell)]
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{cell}: {command} has no {', '.join(unknown)}; it takes {', '.join(sorted(known))}"


@pytest.mark.parametrize("cell", command_table_rows())
def test_every_command_of_the_command_table_parses(cell):
    parse_command(concrete_command(cell), f"README command table: {cell}")


def test_docs_show_commands():
    # The extraction reads what it should: README's Quick start and the docs' examples.
    commands = doc_commands()
    assert any(words == ["demo"] for _, words in commands)
    assert any(words[:1] == ["spectral"] for _, words in commands)
    assert any(words[:1] == ["serve"] for _, words in commands)


@pytest.mark.parametrize("where, words", doc_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_command_in_readme_and_docs_parses(where, words):
    parse_command(words, where)


def test_a_wrong_flag_is_caught():
    # The check itself can fail: a flag that does not exist, and a sweep without its --output.
    with pytest.raises(pytest.fail.Exception, match="--model-path"):
        parse_command(["chat-llava", "--model", "tiny", "--image", "astronaut", "--model-path", "x"], "example")
    with pytest.raises(ValueError, match="--output"):
        parse_command(["sweep", "--suite", "s.yaml", "--model", "m"], "example")
    assert concrete_command("pitome-mllm chat --model PATH_OR_ID [--keep-ratio R | --target-tokens K]") == [
        "chat",
        "--model",
        "tiny",
    ]


def command_table_needs() -> dict[str, str]:
    """README's command table: command -> its "needs" cell."""
    text = README.read_text()
    table = text[text.index("| command | needs |") :].split("\n\n", 1)[0]
    needs = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.replace("\\|", "/").strip("|").split("|")]
        needs[shlex.split(cells[0].strip("`"))[1]] = cells[1]
    return needs


def test_the_command_table_names_every_extra_a_command_needs():
    from pitome_mllm.cli.extras import COMMAND_EXTRAS

    needs = command_table_needs()
    assert set(needs) == set(COMMAND_EXTRAS)
    for command, extras in COMMAND_EXTRAS.items():
        row = needs[command]
        for extra in extras:
            assert extra.name in row, f"README: {command} needs {extra.name}, its row says {row!r}"
        if not extras:
            assert row == "–", f"README: {command} runs on the light install, its row says {row!r}"


# ------------------------------------------------------------------------------ the Python examples
def readme_python_blocks() -> list[str]:
    return fenced_blocks(README.read_text(), ("python",))


def test_readme_has_python_examples():
    assert len(readme_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_every_python_block_of_the_readme_runs_as_written(index, tmp_path, monkeypatch, capsys):
    # Offline, in a fresh cache folder: the tiny checkpoint is built by the example itself.
    monkeypatch.setenv("PITOME_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    source = readme_python_blocks()[index]
    exec(compile(source, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.split()
    if "patch(model, processor" in source:
        # The counts the comments promise.
        assert printed == ["54", "64"]


def test_tiny_checkpoint_is_built_once_and_never_over_a_folder_of_other_files(tmp_path):
    from pitome_mllm.zoo.tiny import TEST_SPEC, tiny_llava_checkpoint

    folder = tiny_llava_checkpoint(tmp_path / "tiny", TEST_SPEC)
    weights = folder / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert tiny_llava_checkpoint(folder, TEST_SPEC) == folder
    assert weights.stat().st_mtime_ns == built
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no model.safetensors"):
        tiny_llava_checkpoint(other, TEST_SPEC)
    assert (other / "notes.txt").read_text() == "mine"

"""``pitome-mllm sweep`` against bad suites, corrupt folders, kills, Ctrl-C and a second runner.

Suite checks run on small hand-written suites; the process cases run the sweep as a real
subprocess, with a stand-in for lmms-eval or (for the kill and lock cases) the real lmms-eval
on the tiny model, skipped without the ``eval`` extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pitome_mllm import cli
from pitome_mllm.experiments.sweep import RESULT_FILE, SweepStopped, aggregate, load_suite, run_dir, run_suite
from pitome_mllm.experiments.sweep.process import LOCK_FILE, failure_signature, repeated_failure, run_child
from pitome_mllm.experiments.sweep.runner import EVALUATED_FILE
from pitome_mllm.experiments.sweep.schema import LOADER_ARGS, MODEL_LOADER_ARGS, SuiteError
from pitome_mllm.experiments.sweep.suite import LOG_FILE

REPO = Path(__file__).resolve().parents[1]
SMOKE_SUITE = REPO / "eval" / "suites" / "smoke.yaml"
GOOD_TASKS = 'tasks: {taska: "exact_match,none"}\n'


def write_suite(folder: Path, text: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------- suite schema
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # names become folders: no separators, no '..'
        (GOOD_TASKS + "runs: {../../../escaped_run: {method: none}}", "run '../../../escaped_run' is not a valid name"),
        ('tasks: {../../../escaped_task: "exact_match,none"}\nruns: {a: {method: none}}', "task '../../../escaped"),
        (GOOD_TASKS + "runs: {a: {method: none, prompt_format: [x/../../y]}}", "expands to run id 'a-prompt_format"),
        # YAML itself
        (GOOD_TASKS + "runs: {a: {method: none}", "not valid suite YAML"),
        (GOOD_TASKS + "runs: !!python/object:os.system {a: 1}", "not valid suite YAML"),
        (GOOD_TASKS + "runs: {a: {method: none}}\nruns: {b: {method: none}}", "key 'runs' is given twice"),
        ("- just\n- a list\n", "a suite is a mapping"),
        # types and values of the keys
        (GOOD_TASKS + "include_path: 5\nruns: {a: {method: none}}", "include_path is 5; it must be a folder"),
        (GOOD_TASKS + "include_path: no_such_folder\nruns: {a: {method: none}}", "is not a folder"),
        (GOOD_TASKS + "batch_size: two\nruns: {a: {method: none}}", "batch_size is 'two'; it must be a whole number"),
        (GOOD_TASKS + "batch_size: 0\nruns: {a: {method: none}}", "batch_size is 0"),
        (GOOD_TASKS + "batch_size: -3\nruns: {a: {method: none}}", "batch_size is -3"),
        (GOOD_TASKS + "model_args: [a, b]\nruns: {a: {method: none}}", "model_args must be a mapping"),
        (GOOD_TASKS + "model_args: {dtype: [float16, float32]}\nruns: {a: {method: none}}", "lists only inside runs"),
        ("tasks: {pitome_smoke: null}\nruns: {a: {method: none}}", "tasks.pitome_smoke is None"),
        ("tasks: {pitome_smoke: exact_match}\nruns: {a: {method: none}}", "'<metric>,<filter>'"),
        (GOOD_TASKS + "runs: {a: {method: pitome, target_tokens: []}}", "runs.a.target_tokens is an empty list"),
        (GOOD_TASKS + "runs: {a: {method: pitome, target_tokens: [{x: 1}]}}", "runs.a.target_tokens is a mapping"),
        (GOOD_TASKS + "runs: []", "'runs' must map run names"),
        (GOOD_TASKS + "runs: {a: {method: none, tempreature: 0}}", "unknown model arguments ['tempreature']"),
        (GOOD_TASKS + "runs: {a: {method: none}}\nname: [x]", "name is ['x']"),
        # two runs sharing one folder
        (
            GOOD_TASKS + "runs: {p-target_tokens16: {method: pitome, target_tokens: 16},"
            " p: {method: pitome, target_tokens: [16, 32]}}",
            "runs 'p-target_tokens16' and 'p' both expand to run id 'p-target_tokens16'",
        ),
    ],
)
def test_bad_suites_get_one_line_naming_the_file_and_the_key(tmp_path, body, expected):
    path = write_suite(tmp_path, body)
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    message = str(caught.value)
    assert expected in message
    assert message.startswith(str(path)) and "\n" not in message


def test_bad_suite_through_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
    suite = write_suite(tmp_path, GOOD_TASKS + "runs: {../../../escaped_run: {method: none}}")
    output = tmp_path / "out"
    assert cli.main(["sweep", "--suite", str(suite), "--model", "m", "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert "escaped_run" in error and len(error.splitlines()) == 1 and "Traceback" not in error
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]


def test_loader_arguments_match_the_plugin():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    import inspect

    from pitome_mllm.integrations.lmms_eval.base import PiToMeLmmsModel
    from pitome_mllm.integrations.lmms_eval.llava_hf import PiToMeLlavaHF

    # The plugin names its own arguments and hands the rest (**arguments) to the shared base class.
    named = set()
    for init in (PiToMeLlavaHF.__init__, PiToMeLmmsModel.__init__):
        parameters = inspect.signature(init).parameters
        named |= {name for name, parameter in parameters.items() if parameter.kind is parameter.POSITIONAL_OR_KEYWORD}
    assert LOADER_ARGS == named - {"self"}


def test_qwen_loader_arguments_match_the_plugin():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    import inspect

    from pitome_mllm.integrations.lmms_eval.base import PiToMeLmmsModel
    from pitome_mllm.integrations.lmms_eval.qwen_vl import PiToMeQwenVL

    named = set()
    for init in (PiToMeQwenVL.__init__, PiToMeLmmsModel.__init__):
        parameters = inspect.signature(init).parameters
        named |= {name for name, parameter in parameters.items() if parameter.kind is parameter.POSITIONAL_OR_KEYWORD}
    assert MODEL_LOADER_ARGS["pitome_qwen2_5_vl"] == MODEL_LOADER_ARGS["pitome_qwen3_vl"] == named - {"self"}
    assert MODEL_LOADER_ARGS["pitome_llava_hf"] == LOADER_ARGS


def test_model_args_override_is_checked_like_the_suite(tmp_path, capsys):
    suite = write_suite(tmp_path, GOOD_TASKS + "runs: {a: {method: pitome, target_tokens: 16}}")
    common = ["sweep", "--suite", str(suite), "--model", "m", "--output", str(tmp_path / "out")]
    assert cli.main([*common, "--model-args", "tempreature=0"]) == 2
    assert "--model-args has unknown model arguments ['tempreature']" in capsys.readouterr().err
    assert cli.main([*common, "--model-args", "keep_ratio=2"]) == 2
    assert "run taska/a gets an invalid patch config: keep_ratio" in capsys.readouterr().err
    # The override wins over the run's own value, in a dry run and in a real one alike.
    assert cli.main([*common, "--model-args", "target_tokens=8,keep_order=true", "--dry-run"]) == 0
    assert "target_tokens=8,keep_order=true,record=" in capsys.readouterr().out
    assert cli.main([*common, "--batch-size", "0"]) == 2
    assert "--batch-size is 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


# ---------------------------------------------------------------------------------- folders
@pytest.fixture
def four_run_suite(tmp_path):
    return load_suite(
        write_suite(
            tmp_path,
            GOOD_TASKS + "baseline: none\nruns: {none: {method: none}, pitome: {method: pitome, "
            "target_tokens: [8, 16, 32]}}",
        )
    )


def test_a_symlink_out_of_the_sweep_folder_is_refused(tmp_path, four_run_suite, fake_launcher):
    output, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (output / "runs").mkdir(parents=True)
    elsewhere.mkdir()
    (output / "runs" / "taska").symlink_to(elsewhere)
    with pytest.raises(SuiteError, match="outside the sweep folder"):
        run_suite(four_run_suite, "tiny", output, launcher=fake_launcher)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is not readable JSON"),
        ("[1, 2]", "holds list"),
        ('{"score": "high"}', "has no numeric 'score'"),
        ('{"score": NaN}', "has no numeric 'score' (nan is not a finite number)"),
        ('{"score": Infinity}', "has no numeric 'score' (inf is not a finite number)"),
        ('{"score": true}', "has no numeric 'score' (True is not a finite number)"),
    ],
)
def test_corrupt_result_files_are_named_and_the_run_redone(
    tmp_path, four_run_suite, fake_launcher, caplog, content, problem
):
    output = tmp_path / "out"
    run_suite(four_run_suite, "tiny", output, launcher=fake_launcher)
    corrupt = run_dir(output, four_run_suite.expand()[1]) / RESULT_FILE
    corrupt.write_text(content)
    with caplog.at_level("WARNING", logger="pitome_mllm"):
        aggregate(output)  # the summary leaves it out instead of failing, and moves nothing
    assert f"{corrupt} {problem}" in caplog.text and "leaving that run out" in caplog.text
    assert corrupt.read_text() == content
    outcome = run_suite(four_run_suite, "tiny", output, launcher=fake_launcher)
    assert outcome["done"] == ["taska/pitome-target_tokens8"] and len(outcome["skipped"]) == 3
    assert json.loads(corrupt.read_text())["score"] == 0.7
    assert corrupt.with_name("result.json.corrupt").read_text() == content


def test_unusable_output_folders_are_one_line_errors(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for output, expected in ((a_file, "is a file, not a folder"), (a_file / "below", "cannot create the folder")):
        status = cli.main(["sweep", "--suite", str(SMOKE_SUITE), "--model", "m", "--output", str(output)])
        error = capsys.readouterr().err
        assert status == 2 and expected in error and "Traceback" not in error
    assert a_file.read_text() == "keep me"


# ---------------------------------------------------------------------------------- fail fast
def test_runs_failing_the_same_way_stop_the_sweep_with_the_cause(tmp_path, fake_launcher, monkeypatch, capsys):
    runs = "runs: {pitome: {method: pitome, target_tokens: [8, 16, 32, 48]}}"
    suite = load_suite(write_suite(tmp_path, GOOD_TASKS + runs))
    monkeypatch.setenv("FAKE_MODE", "crash")
    launcher = " ".join(fake_launcher)
    status = cli.main(["sweep", "--suite", str(suite.path), "--model", "m", "--output", str(tmp_path / "out"),
                       "--launcher", launcher])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert "the last 3 runs failed the same way before evaluating anything: " in captured.err
    assert "ModuleNotFoundError: No module named 'lmms_eval'" in captured.err
    assert "| ModuleNotFoundError" in captured.out + captured.err  # the log's tail is shown
    assert not (tmp_path / "out" / "runs" / "taska" / "pitome-target_tokens48").exists()  # the 4th never ran


def test_a_baseline_that_cannot_start_stops_the_sweep(tmp_path, four_run_suite, fake_launcher, monkeypatch):
    from pitome_mllm.experiments.sweep import SweepStopped

    monkeypatch.setenv("FAKE_MODE", "crash")
    with pytest.raises(SweepStopped, match="baseline run taska/none failed") as stopped:
        run_suite(four_run_suite, "tiny", tmp_path / "out", launcher=fake_launcher)
    assert stopped.value.outcome["failed"] == ["taska/none"]


def test_repeated_failure_needs_the_same_early_cause_in_a_row():
    boom = failure_signature(["Traceback (most recent call last):", "RuntimeError: boom", "exiting"])
    assert boom == "RuntimeError: boom"
    assert repeated_failure([boom, boom, boom]) == boom
    assert repeated_failure([None, boom, boom]) is None
    assert repeated_failure([boom, "OSError: disk full", boom]) is None
    assert repeated_failure([None, boom, boom, boom]) == boom


# ---------------------------------------------------------------------------------- processes
def sweep_process(args: list[str], **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen(
        [sys.executable, "-m", "pitome_mllm.cli", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        # As from a terminal: a test run started in the background (a shell without job control ignores
        # SIGINT there, and children inherit that) must still let Ctrl-C reach the sweep.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition, what: str, timeout_s: float = 300.0):
    """Poll ``condition`` until it returns something truthy (the timeout only stops a hung test)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def lock_child(output: Path) -> int | None:
    try:
        return json.loads((output / LOCK_FILE).read_text() or "{}").get("child")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_ends_the_child_and_says_how_to_resume(tmp_path, four_run_suite, fake_launcher):
    output = tmp_path / "out"
    run_suite(four_run_suite, "tiny", output, only=["taska/none"], launcher=fake_launcher)
    sweep = sweep_process(["--suite", str(four_run_suite.path), "--model", "tiny", "--output", str(output),
                           "--launcher", " ".join(fake_launcher)], FAKE_MODE="sleep")  # fmt: skip
    child = wait_for(lambda: lock_child(output), "the lmms-eval stand-in to start")
    # Ctrl-C while lmms-eval is evaluating: once the stand-in has said so in the run's log.
    wait_for(
        lambda: any("evaluating" in log.read_text() for log in output.rglob(LOG_FILE)), "the stand-in to be evaluating"
    )
    sweep.send_signal(signal.SIGINT)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "0 run(s) done, 1 skipped" in out
    assert "resume with the same command:" in err and f"--output {output}" in err
    wait_for(lambda: not process_running(child), "the child to end", timeout_s=60)
    assert (output / LOCK_FILE).read_text() == ""  # released
    assert (run_dir(output, four_run_suite.expand()[0]) / RESULT_FILE).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")
def test_sigkill_lock_and_resume_with_the_real_lmms_eval(tmp_path):
    """SIGKILL of the sweep takes its lmms-eval child along; the next sweep takes over the stale
    lock, refuses a second sweep on the folder while it runs, and leaves exactly one results file."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from pitome_mllm.zoo.tiny import TEST_SPEC, save_tiny_llava

    model = save_tiny_llava(tmp_path / "tiny", TEST_SPEC)
    output = tmp_path / "sweep"
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["--suite", str(SMOKE_SUITE), "--model", str(model), "--output", str(output), "--limit", "2",
            "--only", "pitome_smoke/pitome-target_tokens16"]  # fmt: skip
    folder = output / "runs" / "pitome_smoke" / "pitome-target_tokens16"
    first = sweep_process(args, **env)
    child = wait_for(lambda: lock_child(output), "lmms-eval to start")
    # Killed while lmms-eval is still starting (it takes seconds to import), so the kill matters.
    assert process_running(child)
    first.kill()
    first.communicate(timeout=60)
    wait_for(lambda: not process_running(child), "lmms-eval to end", timeout_s=300)
    # It died with the sweep: an orphan would have finished its evaluation and written into the folder.
    assert not list(folder.rglob("*_results.json")) and not (folder / "pitome_record.json").exists()

    resumed = sweep_process(args, **env)
    wait_for(lambda: lock_child(output) not in (None, child), "the resumed sweep's lmms-eval to start")
    second = sweep_process(args, **env)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2
    assert f"is in use by another sweep (pid {resumed.pid}" in err and "Traceback" not in err

    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"the sweep that held it (pid {first.pid}" in err
    assert len(list(folder.rglob("*_results.json"))) == 1
    assert json.loads((folder / RESULT_FILE).read_text())["num_visual_tokens"] == 16


def worker_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreaper and /proc are Linux's")
@pytest.mark.parametrize("launcher_kind", ["sh -c wrapper", "worker in its own process group"])
def test_sigkill_of_the_sweep_ends_a_forking_launchers_tree(tmp_path, four_run_suite, fake_launcher, launcher_kind):
    """The worker of a forking launcher (``torchrun``'s workers start their own process group; an
    ``sh -c`` wrapper is the direct child) dies with the sweep, and the resumed run folder holds one result."""
    output, pid_file = tmp_path / "out", tmp_path / "worker.pid"
    if launcher_kind == "sh -c wrapper":
        launcher, mode = ["sh", "-c", '"$0" "$@"; exit $?', *fake_launcher], "sleep"
    else:
        launcher, mode = fake_launcher, "fork"
    args = ["--suite", str(four_run_suite.path), "--model", "tiny", "--output", str(output), "--only", "taska/none",
            "--launcher", shlex.join(launcher)]  # fmt: skip
    sweep = sweep_process(args, FAKE_MODE=mode, FAKE_WORKER_PID=str(pid_file))
    worker = wait_for(lambda: worker_pid(pid_file), "the worker to start", timeout_s=120)
    try:
        sweep.kill()
        sweep.communicate(timeout=60)
        wait_for(lambda: not process_running(worker), "the worker to end with the sweep", timeout_s=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    resumed = sweep_process(args)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    folder = run_dir(output, four_run_suite.expand()[0])
    assert len(list(folder.rglob("*_results.json"))) == 1


@pytest.mark.parametrize(
    "planted",
    ["runs/taska/none/lmms_eval.log", "runs/taska/none/lmms_eval", "summary.csv", "summary.md", ".sweep.lock"],
)
def test_a_symlink_inside_the_sweep_folder_is_never_written_through(tmp_path, four_run_suite, fake_launcher, planted):
    output, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    run_suite(four_run_suite, "tiny", output, only=["taska/none"], launcher=fake_launcher)
    folder = run_dir(output, four_run_suite.expand()[0])
    for name in (RESULT_FILE, EVALUATED_FILE):  # so that the rerun evaluates that run again
        (folder / name).unlink()
    elsewhere.mkdir()
    target = elsewhere / "target"
    if planted.endswith("lmms_eval"):
        target.mkdir()
        (target / "keep.txt").write_text("precious")
    else:
        target.write_text("precious")
    link = output / planted
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(target)
    with pytest.raises(SuiteError, match=rf"{re.escape(str(link))} is a symbolic link"):
        run_suite(four_run_suite, "tiny", output, only=["taska/none"], launcher=fake_launcher)
        aggregate(output)
    assert sorted(path.name for path in elsewhere.rglob("*")) == (
        ["keep.txt", "target"] if planted.endswith("lmms_eval") else ["target"]
    )
    assert (target / "keep.txt" if target.is_dir() else target).read_text() == "precious"


def test_a_metric_typo_stops_after_the_first_run_and_the_rerun_reuses_its_evaluation(
    tmp_path, fake_launcher, monkeypatch
):
    body = "baseline: none\nruns: {none: {method: none}, pitome: {method: pitome, target_tokens: [8, 16, 32]}}"
    typo = load_suite(write_suite(tmp_path, 'tasks: {taska: "exact_matchh,none"}\n' + body))
    output = tmp_path / "out"
    with pytest.raises(SweepStopped, match=r"no metric 'exact_matchh,none'.*\['exact_match,none'\]") as stopped:
        run_suite(typo, "tiny", output, launcher=fake_launcher)
    assert stopped.value.outcome == {"done": [], "skipped": [], "failed": ["taska/none"]}
    assert len(list((output / "runs").rglob("*_results.json"))) == 1  # one evaluation, not four
    fixed = load_suite(write_suite(tmp_path, GOOD_TASKS + body))
    # A launcher that can only fail: the fixed metric must be read from the kept evaluation.
    monkeypatch.setenv("FAKE_MODE", "crash")
    outcome = run_suite(fixed, "tiny", output, only=["taska/none"], launcher=fake_launcher)
    assert outcome["done"] == ["taska/none"]
    assert json.loads((run_dir(output, fixed.expand()[0]) / RESULT_FILE).read_text())["score"] == 0.8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreaper and /proc are Linux's")
def test_a_worker_left_behind_by_a_launcher_that_exited_is_ended(tmp_path):
    pid_file = tmp_path / "worker.pid"
    # The launcher exits at once, leaving a worker in its own session (setsid) that would run on.
    launcher = ["sh", "-c", f'setsid sleep 600 & echo $! > "{pid_file}"; exit 3']
    with open(tmp_path / "log", "w") as log:
        assert run_child(launcher, log) == 3
    worker = int(pid_file.read_text())
    try:
        wait_for(lambda: not process_running(worker), "the left-behind worker to end", timeout_s=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)

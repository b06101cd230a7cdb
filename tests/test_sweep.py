"""``pitome-mllm sweep``: suite files, resuming, aggregation (pitome_mllm.experiments.sweep).

Suite parsing, resuming and aggregation run with a stand-in for lmms-eval; the end-to-end test
runs the real lmms-eval on the tiny model and is skipped without the ``eval`` extra.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest

from pitome_mllm import cli
from pitome_mllm.config import PiToMeConfig
from pitome_mllm.experiments.sweep import (
    RESULT_FILE,
    aggregate,
    load_suite,
    markdown_table,
    run_dir,
    run_suite,
    summary_rows,
    write_json_atomically,
)

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "eval" / "suites"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_suite(folder: Path, text: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------- suite files
def test_token_budget_suite_expands_to_every_task_method_and_budget():
    suite = load_suite(SUITES / "token_budgets.yaml")
    runs = suite.expand()
    tasks = ["gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "vqav2_val", "textvqa_val"]
    assert list(suite.tasks) == tasks
    methods = ("pitome", "tome", "random", "pool", "dominant")
    assert len(runs) == len(tasks) * (1 + len(methods) * 3 + 1)
    gqa_runs = {run.run_id: run for run in runs if run.task == "gqa"}
    budgets = {f"{m}-target_tokens{t}" for m in methods for t in (192, 128, 64)}
    assert set(gqa_runs) == {"none", "floor"} | budgets
    assert gqa_runs["floor"].model_args["target_tokens"] == 0
    assert gqa_runs["tome-target_tokens64"].model_args == {
        "prompt_format": "llava_v1",
        "dtype": "float16",
        "method": "tome",
        "preset": "reference",
        "target_tokens": 64,
    }
    assert suite.baseline == "none" and suite.tasks["mme"] == "mme_perception_score,none"


def test_low_budget_suite_runs_every_method_at_four_budgets_on_eight_benchmarks():
    suite = load_suite(SUITES / "low_budget.yaml")
    table3 = list(load_suite(SUITES / "paper_table3.yaml").tasks)
    assert list(suite.tasks) == [*table3, "pope", "mmbench_en_dev"]
    runs = [run for run in suite.expand() if run.task == "pope"]
    by_name: dict[str, set[int]] = {}
    for run in runs:
        by_name.setdefault(run.run_id.split("-")[0], set()).add(run.model_args.get("target_tokens"))
    methods = ("pitome", "tome", "pitome_mllm", "random", "pool", "visionzip", "fastervlm", "divprune", "cdpruner")
    assert set(by_name) == {"none", "floor", *methods}
    assert all(by_name[name] == {192, 128, 64, 32} for name in methods)
    mllm = next(run for run in runs if run.run_id == "pitome_mllm-target_tokens32")
    assert (mllm.model_args["method"], mllm.model_args["preset"]) == ("pitome", "mllm")
    for run in runs:  # every run is a valid patch config
        PiToMeConfig(**run.patch_args())


def test_a_suite_may_name_mllm_as_a_method_or_as_the_preset(tmp_path):
    suite = load_suite(
        write_suite(
            tmp_path,
            """
            name: spellings
            tasks: {pope: "exact_match,none"}
            runs:
              as_method: {method: mllm, target_tokens: [64, 32]}
              as_preset: {method: pitome, preset: mllm, target_tokens: [64, 32]}
            """,
        )
    )
    configs: dict[str, dict[int, PiToMeConfig]] = {}
    for run in suite.expand():
        config = PiToMeConfig(**run.patch_args())
        configs.setdefault(run.run_id.split("-")[0], {})[config.target_tokens] = config
    assert configs["as_method"] == configs["as_preset"]
    assert all(config.method == "mllm" for config in configs["as_method"].values())


@pytest.mark.parametrize("path", sorted(SUITES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_suite_passes_the_checker(path):
    suite = load_suite(path)
    assert suite.expand() and suite.lmms_model in ("pitome_llava_hf", "pitome_qwen2_5_vl", "pitome_qwen3_vl")


def test_qwen_budget_suite_caps_every_image_at_a_fraction_of_its_native_tokens():
    suite = load_suite(SUITES / "qwen_budgets.yaml")
    assert suite.lmms_model == "pitome_qwen2_5_vl" and suite.baseline == "none"
    ocr = {"textvqa_val", "docvqa_val", "chartqa", "ocrbench"}
    paper = {"vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "mme", "pope", "mmbench_en_dev"}
    assert set(suite.tasks) == ocr | paper
    # 448 * 448 pixels: 256 native tokens for a square image; the caps are 1/2 ... 1/16 of that.
    assert suite.model_args["max_pixels"] == suite.model_args["min_pixels"] == 448 * 448
    native = (448 // 28) ** 2
    runs = {run.run_id: run for run in suite.expand() if run.task == "ocrbench"}
    fractions = (2, 4, 8, 16)
    methods = ("pitome", "tome", "random", "divprune")
    assert set(runs) == {"none"} | {f"{m}-target_tokens{native // f}" for m in methods for f in fractions}
    assert all(run.lmms_model == "pitome_qwen2_5_vl" for run in runs.values())
    assert runs["pitome-target_tokens16"].model_args == {
        "dtype": "bfloat16",
        "min_pixels": 200704,
        "max_pixels": 200704,
        "method": "pitome",
        "target_tokens": 16,
    }


def test_the_suite_names_the_lmms_eval_model_and_its_arguments(tmp_path, capsys):
    qwen = 'lmms_model: pitome_qwen3_vl\ntasks: {gqa: "exact_match,none"}\nruns: {a: {method: none, max_pixels: 50176}}'
    suite = load_suite(write_suite(tmp_path, qwen))
    assert [run.lmms_model for run in suite.expand()] == ["pitome_qwen3_vl"]
    assert cli.main(["sweep", "--suite", str(suite.path), "--model", "m", "--dry-run",
                     "--model-args", "min_pixels=3136"]) == 0  # fmt: skip
    (command,) = capsys.readouterr().out.strip().splitlines()
    assert " --model pitome_qwen3_vl " in command and "max_pixels=50176,min_pixels=3136," in command
    llava_with_pixels = 'tasks: {gqa: "exact_match,none"}\nruns: {a: {method: none, max_pixels: 50176}}'
    with pytest.raises(ValueError, match=r"unknown model arguments \['max_pixels'\]"):
        load_suite(write_suite(tmp_path, llava_with_pixels))
    with pytest.raises(ValueError, match="lmms_model is 'qwen2_5_vl'; it must be one of"):
        load_suite(write_suite(tmp_path, qwen.replace("pitome_qwen3_vl", "qwen2_5_vl")))
    with pytest.raises(ValueError, match=r"unknown model arguments \['prompt_format'\]"):
        load_suite(write_suite(tmp_path, qwen.replace("max_pixels: 50176", "prompt_format: llava_v1")))


def test_paper_table_suite_uses_the_paper_settings():
    suite = load_suite(SUITES / "paper_table3.yaml")
    assert list(suite.tasks) == ["vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val", "mme"]
    runs = [run for run in suite.expand() if run.task == "mme"]
    assert [run.run_id for run in runs] == [
        "none",
        "tome-keep_ratio0.9",
        "tome-keep_ratio0.925",
        "pitome-keep_ratio0.9",
        "pitome-keep_ratio0.925",
    ]
    assert all(run.model_args.get("preset") == "paper" for run in runs if run.method != "none")


def test_suite_task_and_metric_names_exist_in_lmms_eval():
    lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    import yaml

    tasks_root = Path(lmms_eval.__file__).parent / "tasks"
    metric_names_by_task: dict[str, str] = {}
    for path in tasks_root.rglob("*.yaml"):
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("task:"):
                name = yaml.safe_load(line)["task"]
                metric_names_by_task[str(name)] = text
    for suite_file in ("paper_table3.yaml", "token_budgets.yaml", "low_budget.yaml", "qwen_budgets.yaml"):
        for task, metric in load_suite(SUITES / suite_file).tasks.items():
            assert task in metric_names_by_task, f"{suite_file}: no lmms-eval task {task!r}"
            metric_name = metric.split(",")[0]
            # The metric is declared in the task's YAML or in the template it includes.
            declared = metric_names_by_task[task] + "".join(
                path.read_text(errors="replace") for path in tasks_root.rglob("_default_template*")
            )
            assert f"metric: {metric_name}" in declared, f"{suite_file}: {task} has no metric {metric_name}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('tasks: {gqa: "exact_match,none"}\nruns: {a: {method: none, pretrained: x}}', "may not set"),
        ('tasks: {gqa: "exact_match,none"}\nruns: {a: {method: none}}\nbaseline: b', "baseline 'b'"),
        ('tasks: {gqa: "exact_match,none"}\nruns: {a: {method: pitome}}', "invalid patch config"),
        ("tasks: {gqa: \"exact_match,none\"}\nruns: {a: {method: none, prompt_format: 'a,b'}}", "may not contain"),
        ('tasks: {gqa: "exact_match,none"}\nrun: {a: {method: none}}', "unknown keys"),
        ("runs: {a: {method: none}}", "'tasks' must map"),
    ],
)
def test_bad_suites_are_rejected_with_the_reason(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_suite(write_suite(tmp_path, body))


# ---------------------------------------------------------------------------------- resuming
@pytest.fixture
def small_suite(tmp_path):
    return load_suite(
        write_suite(
            tmp_path,
            """
            name: small
            tasks: {taska: "exact_match,none", taskb: "exact_match,none"}
            baseline: none
            runs:
              none: {method: none}
              pitome: {method: pitome, target_tokens: [32, 16]}
            """,
        )
    )


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, small_suite, fake_launcher):
    output = tmp_path / "sweep"
    first = run_suite(small_suite, "tiny", output, limit=2, only=["taska/*"], launcher=fake_launcher)
    assert first == {"done": ["taska/none", "taska/pitome-target_tokens32", "taska/pitome-target_tokens16"],
                     "skipped": [], "failed": []}  # fmt: skip
    finished = run_dir(output, small_suite.expand()[0]) / RESULT_FILE
    finished_bytes, finished_mtime = finished.read_bytes(), finished.stat().st_mtime_ns
    # An attempt that was interrupted after lmms-eval wrote a (stale) results file but before
    # result.json: it must be redone from scratch, not read back.
    stale = output / "runs" / "taskb" / "none" / "lmms_eval" / "old"
    stale.mkdir(parents=True)
    (stale / "19990101_results.json").write_text(json.dumps({"results": {"taskb": {"exact_match,none": 0.0}}}))

    second = run_suite(small_suite, "tiny", output, limit=2, launcher=fake_launcher)
    assert second["skipped"] == first["done"] and len(second["done"]) == 3 and not second["failed"]
    assert finished.read_bytes() == finished_bytes and finished.stat().st_mtime_ns == finished_mtime
    rerun = json.loads((output / "runs" / "taskb" / "none" / RESULT_FILE).read_text())
    assert rerun["score"] == 0.8 and not stale.exists()
    for run in small_suite.expand():
        folder = run_dir(output, run)
        assert json.loads((folder / "patch_config.json").read_text())["method"] == run.method
        assert (folder / "lmms_eval.log").read_text().startswith(sys.executable)


def test_silent_lmms_eval_failure_is_reported_and_retried(tmp_path, small_suite, fake_launcher, monkeypatch):
    output = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_LMMS_EVAL_FAIL", "pitome")
    outcome = run_suite(small_suite, "tiny", output, only=["taska/*"], launcher=fake_launcher)
    assert outcome["done"] == ["taska/none"]
    assert outcome["failed"] == ["taska/pitome-target_tokens32", "taska/pitome-target_tokens16"]
    assert not (output / "runs" / "taska" / "pitome-target_tokens32" / RESULT_FILE).exists()
    monkeypatch.delenv("FAKE_LMMS_EVAL_FAIL")
    retried = run_suite(small_suite, "tiny", output, only=["taska/*"], launcher=fake_launcher)
    assert retried["done"] == outcome["failed"] and retried["skipped"] == ["taska/none"]


def test_results_of_other_settings_are_not_mixed_in(tmp_path, small_suite, fake_launcher):
    output = tmp_path / "sweep"
    run_suite(small_suite, "tiny", output, limit=2, only=["taska/none"], launcher=fake_launcher)
    with pytest.raises(ValueError, match="limit"):
        run_suite(small_suite, "tiny", output, limit=5, only=["taska/none"], launcher=fake_launcher)
    with pytest.raises(ValueError, match="no run"):
        run_suite(small_suite, "tiny", output, only=["nothing/*"], launcher=fake_launcher)


# ---------------------------------------------------------------------------------- aggregation
def fake_result(task: str, run: str, method: str, score: float, tokens: float, **extra) -> dict:
    return {
        "task": task,
        "run": run,
        "run_name": run.split("-")[0],
        "method": method,
        "baseline_run": "none",
        "metric": "exact_match,none",
        "score": score,
        "limit": None,
        "patch_config": {"target_tokens": None if method == "none" else int(tokens), "preset": "reference"},
        "cost": {"mean_visual_tokens": tokens, "mean_ttft_s": 0.002 * tokens, "peak_memory_mib": 100.0 + tokens},
        **extra,
    }


def write_results(output: Path, results: list[dict]) -> None:
    for result in results:
        write_json_atomically(output / "runs" / result["task"] / result["run"] / RESULT_FILE, result)


def test_aggregate_relates_every_score_to_the_baseline_of_its_task(tmp_path):
    output = tmp_path / "sweep"
    write_results(
        output,
        [
            fake_result("gqa", "none", "none", 0.60, 576),
            fake_result("gqa", "pitome-target_tokens64", "pitome", 0.54, 64),
            fake_result("gqa", "tome-target_tokens64", "tome", 0.48, 64),
            fake_result("mme", "none", "none", 1500.0, 576),
            fake_result("mme", "pitome-target_tokens64", "pitome", 1200.0, 64),
        ],
    )
    paths = aggregate(output)

    with open(paths["csv"]) as stream:
        rows = {(row["task"], row["run"]): row for row in csv.DictReader(stream)}
    assert len(rows) == 5
    assert float(rows["gqa", "pitome-target_tokens64"]["relative_pct"]) == pytest.approx(90.0)
    assert float(rows["gqa", "tome-target_tokens64"]["relative_pct"]) == pytest.approx(80.0)
    assert float(rows["mme", "pitome-target_tokens64"]["relative_pct"]) == pytest.approx(80.0)
    assert float(rows["mme", "none"]["relative_pct"]) == pytest.approx(100.0)
    assert float(rows["gqa", "pitome-target_tokens64"]["ttft_ms"]) == pytest.approx(128.0)
    markdown = paths["markdown"].read_text()
    assert "| none | none | 576 | 0.6 (100.0%) | 1500 (100.0%) | 100 |" in markdown
    assert "| pitome-target_tokens64 | pitome | 64 | 0.54 (90.0%) | 1200 (80.0%) | 85 |" in markdown
    assert "| tome-target_tokens64 | tome | 64 | 0.48 (80.0%) |  | 80 |" in markdown
    assert paths["plot"].read_bytes().startswith(PNG_SIGNATURE)


def test_aggregate_marks_the_best_method_of_each_budget():
    results = [
        fake_result("gqa", "none", "none", 0.60, 576),
        fake_result("gqa", "pitome-target_tokens64", "pitome", 0.54, 64),
        fake_result("gqa", "pool-target_tokens64", "pool", 0.57, 64),
        fake_result("gqa", "random-target_tokens128", "random", 0.50, 128),
        fake_result("gqa", "dominant-target_tokens128", "dominant", 0.50, 128),
        fake_result("gqa", "floor", "none", 0.30, 0, patch_config={"target_tokens": 0}),
    ]
    rows = {row["run"]: row for row in summary_rows(results)}
    assert rows["none"]["best_at_budget"] is None  # the reference, not a competitor
    assert rows["pool-target_tokens64"]["best_at_budget"] and not rows["pitome-target_tokens64"]["best_at_budget"]
    assert rows["random-target_tokens128"]["best_at_budget"] and rows["dominant-target_tokens128"]["best_at_budget"]
    # The 0-token floor is the 0% reference, as the baseline is the 100% one: never "best at budget 0".
    assert rows["floor"]["budget"] == 0 and rows["floor"]["best_at_budget"] is None
    markdown = markdown_table(list(rows.values()))
    assert "Best method per budget" in markdown
    assert "| 128 | dominant = random 0.5 (83.3%) |" in markdown
    assert "| 64 | pool 0.57 (95.0%) |" in markdown
    assert "| 0 |" not in markdown.split("Best method per budget")[1]


def test_smoke_suite_runs_every_method_at_two_budgets():
    suite = load_suite(SUITES / "smoke.yaml")
    runs = {run.run_id: run for run in suite.expand()}
    methods = ("pitome", "tome", "random", "pool", "dominant")
    assert set(runs) == {"none", "floor"} | {f"{m}-target_tokens{t}" for m in methods for t in (16, 32)}


def test_relative_accuracy_is_blank_without_a_usable_baseline():
    results = [fake_result("gqa", "none", "none", 0.0, 576), fake_result("pope", "pitome-x", "pitome", 0.5, 64)]
    rows = summary_rows(results)
    assert [row["relative_pct"] for row in rows] == [None, None]
    assert "| pitome-x | pitome | 64 |  | 0.5 |" in markdown_table(rows)


def test_cli_aggregate_and_dry_run(tmp_path, capsys):
    output = tmp_path / "sweep"
    write_results(output, [fake_result("gqa", "none", "none", 0.6, 576)])
    assert cli.main(["sweep", "--aggregate", str(output)]) == 0
    assert "| none | none | 576 |" in capsys.readouterr().out

    assert cli.main(["sweep", "--suite", str(SUITES / "token_budgets.yaml"), "--model", "m", "--dry-run",
                     "--only", "gqa/*", "--limit", "8", "--output", str(output)]) == 0  # fmt: skip
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 17
    assert all(" -m lmms_eval --model pitome_llava_hf " in command for command in commands)
    assert all("--verbosity DEBUG" in command and "--limit 8" in command for command in commands)
    assert any("method=pitome,preset=reference,target_tokens=64,record=" in command for command in commands)
    assert cli.main(["sweep", "--suite", str(SUITES / "token_budgets.yaml")]) == 2  # --model missing


def test_aggregate_without_results_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["sweep", "--aggregate", str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- end to end
def test_smoke_suite_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    """The real lmms-eval on the tiny model: run part of the smoke suite (as if interrupted),
    resume it through the CLI, aggregate."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from pitome_mllm.zoo.tiny import TEST_SPEC, save_tiny_llava

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = save_tiny_llava(tmp_path / "tiny", TEST_SPEC)
    output = tmp_path / "sweep"
    suite = load_suite(SUITES / "smoke.yaml")

    first = run_suite(suite, str(model), output, limit=2, only=["pitome_smoke/none"])
    assert first == {"done": ["pitome_smoke/none"], "skipped": [], "failed": []}
    baseline_file = output / "runs" / "pitome_smoke" / "none" / RESULT_FILE
    baseline_bytes = baseline_file.read_bytes()

    status = cli.main(["sweep", "--suite", str(SUITES / "smoke.yaml"), "--model", str(model), "--output", str(output),
                       "--limit", "2", "--only", "pitome_smoke/none",
                       "--only", "pitome_smoke/pitome-target_tokens16"])  # fmt: skip
    assert status == 0
    assert baseline_file.read_bytes() == baseline_bytes

    rows = {row["run"]: row for row in summary_rows([json.loads(p.read_text()) for p in output.rglob(RESULT_FILE)])}
    assert set(rows) == {"none", "pitome-target_tokens16"}
    assert rows["none"]["visual_tokens"] == TEST_SPEC.num_patches
    assert rows["pitome-target_tokens16"]["visual_tokens"] == 16
    for row in rows.values():
        assert 0.0 <= row["score"] <= 1.0 and row["samples"] == 2
        assert row["ttft_ms"] > 0 and row["peak_memory_mib"] > 0
    record_path = output / "runs" / "pitome_smoke" / "pitome-target_tokens16" / "pitome_record.json"
    record = json.loads(record_path.read_text())
    assert record["patch"]["config"]["target_tokens"] == 16 and record["patch"]["num_visual_tokens"] == 16
    for name in ("summary.csv", "summary.md"):
        assert "pitome-target_tokens16" in (output / name).read_text()
    assert (output / "accuracy_vs_tokens.png").read_bytes().startswith(PNG_SIGNATURE)

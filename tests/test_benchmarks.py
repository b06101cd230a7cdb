"""The GPU benchmark's ``--device cpu --tiny`` mode on LLaVA and Qwen2.5-VL, its one-line refusal when a package is
missing, and its wrapper script: the GPU run is prepared code, and this is where it runs before a GPU machine sees
it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pitome_mllm.testing.scripts import BENCHMARKS
from pitome_mllm.testing.scripts import load_benchmark_script as load_script

ARCHS = ("llava-1.5-7b", "qwen2.5-vl-7b")


@pytest.fixture(scope="module", params=ARCHS)
def tiny_report(request, tmp_path_factory):
    """One tiny run of an architecture's family: unpatched (64 tokens: the tiny LLaVA, or the tiny Qwen2.5-VL's
    224 x 224 image) and PiToMe at 40, batch 1 and 2, eager and compiled (Dynamo only)."""
    gpu_benchmark = load_script("gpu_benchmark")
    output = tmp_path_factory.mktemp("gpu_benchmark")
    argv = ["--device", "cpu", "--tiny", "--arch", request.param, "--tokens", "64", "40", "--batch-sizes", "1", "2"]
    argv += ["--repeats", "1", "--warmup", "1", "--compile-backend", "eager", "--output", str(output)]
    argv += ["--stem", "tiny"]
    assert gpu_benchmark.main(argv) == 0
    report = json.loads((output / "tiny.json").read_text())
    return report, (output / "tiny.md").read_text()


def cell(report, mode, tokens, batch):
    return next(c for c in report["cells"] if (c["mode"], c["tokens"], c["batch"]) == (mode, tokens, batch))


def is_qwen(report) -> bool:
    return report["arch"].startswith("qwen")


def test_every_cell_is_measured_with_the_token_count_asked_for(tiny_report):
    report, _ = tiny_report
    assert report["arch"] in ARCHS and report["tiny"]
    assert len(report["cells"]) == 2 * 2 * 2
    for entry in report["cells"]:
        assert "skipped" not in entry and "error" not in entry
        assert entry["visual_tokens"] == entry["tokens"]
        assert entry["prompt_image_tokens"] == entry["tokens"]
        assert entry["visual_tokens_expected"] == (None if entry["tokens"] == 64 else entry["tokens"])


def test_stages_lie_inside_the_time_to_first_token(tiny_report):
    report, _ = tiny_report
    expected = ["vision_tower", "reduction", "llm_prefill"] if is_qwen(report) else ["vision_tower", "projector"]
    assert list(report["stages"])[: len(expected)] == expected
    for entry in report["cells"]:
        stages = sum(entry[f"{stage}_ms"] for stage in report["stages"])
        assert 0 < stages <= entry["ttft_ms"] * (1 + 1e-6)


def test_merge_share_is_measured_where_the_merge_can_be_timed(tiny_report):
    """LLaVA: the merge steps' share of the tower, eager only (a compiled tower fuses them). Qwen-VL: the
    reduction's share of the time to first token, eager and compiled (it runs after the compiled tower)."""
    report, _ = tiny_report
    assert report["merge_share"] == ("reduction / ttft" if is_qwen(report) else "merge_tower / vision_tower")
    for batch in (1, 2):
        assert 0 < cell(report, "eager", 40, batch)["merge_share"] < 1
        assert cell(report, "eager", 64, batch)["merge_share"] is None
        compiled = cell(report, "compiled", 40, batch)["merge_share"]
        assert (0 < compiled < 1) if is_qwen(report) else compiled is None


def test_compiled_cells_count_graphs_and_breaks(tiny_report):
    report, _ = tiny_report
    for entry in report["cells"]:
        if entry["mode"] == "compiled":
            assert entry["graphs"] >= 1 and entry["graph_breaks"] >= 0
        else:
            assert entry["graphs"] is None and entry["graph_breaks"] is None
    if not is_qwen(report):  # The unpatched tiny CLIP tower is one graph.
        assert cell(report, "compiled", 64, 1)["graph_breaks"] == 0


def test_kv_cache_follows_the_sequence_and_the_batch(tiny_report):
    report, _ = tiny_report
    for mode in ("eager", "compiled"):
        full, merged = cell(report, mode, 64, 1), cell(report, mode, 40, 1)
        assert full["sequence_length"] - merged["sequence_length"] == 64 - 40
        per_position = full["kv_cache_bytes"] / full["sequence_length"]
        assert merged["kv_cache_bytes"] == per_position * merged["sequence_length"]
        assert cell(report, mode, 64, 2)["kv_cache_bytes"] == 2 * full["kv_cache_bytes"]
        assert full["peak_memory_bytes"] > 0


def test_report_names_the_machine_and_tabulates_every_cell(tiny_report):
    report, table = tiny_report
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert table.count("\n| eager |") == 4 and table.count("\n| compiled |") == 4
    assert ("| reduction ms |" in table) == is_qwen(report) and "| prefill ms |" in table


def test_a_cell_past_the_time_budget_is_recorded_as_skipped(tmp_path):
    gpu_benchmark = load_script("gpu_benchmark")
    argv = ["--device", "cpu", "--tiny", "--tokens", "64", "--batch-sizes", "1", "--modes", "eager"]
    assert gpu_benchmark.main([*argv, "--budget-s", "0", "--output", str(tmp_path), "--stem", "skip"]) == 0
    (entry,) = json.loads((tmp_path / "skip.json").read_text())["cells"]
    assert entry["mode"] == "eager" and "budget" in entry["skipped"]
    assert "skipped" in (tmp_path / "skip.md").read_text()


def test_architectures_share_one_budget_and_name_their_files(tmp_path):
    """What gpu.sh runs: LLaVA, then Qwen2.5-VL, on one clock; past the budget an architecture is not even built,
    and every cell of it is recorded as skipped, in files named after it."""
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--device", "cpu", "--tiny", "--budget-s", "0", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for arch, slug in (("llava-1.5-7b", "llava_1_5_7b"), ("qwen2.5-vl-7b", "qwen2_5_vl_7b")):
        report = json.loads((tmp_path / f"gpu_benchmark_tiny_{slug}_cpu.json").read_text())
        assert report["arch"] == arch and "not built" in report["model"]
        assert len(report["cells"]) == 2 * 4 * 2 and all("budget" in entry["skipped"] for entry in report["cells"])
        assert (tmp_path / f"gpu_benchmark_tiny_{slug}_cpu.md").read_text().count("skipped") == 16
    assert result.stdout.index("llava-1.5-7b") < result.stdout.index("qwen2.5-vl-7b")


def test_a_cell_whose_prompt_misses_the_budget_fails_naming_the_count(tmp_path, monkeypatch):
    gpu_benchmark = load_script("gpu_benchmark")
    counted = gpu_benchmark.prompt_image_tokens
    monkeypatch.setattr(gpu_benchmark, "prompt_image_tokens", lambda processor, ids: counted(processor, ids) + 1)
    argv = ["--device", "cpu", "--tiny", "--arch", "qwen2.5-vl-7b", "--tokens", "40", "--batch-sizes", "1"]
    argv += ["--modes", "eager", "--repeats", "1", "--warmup", "1", "--output", str(tmp_path), "--stem", "count"]
    # The native count is read with the same function: 64 + 1 placeholders, so 40 is a valid budget.
    assert gpu_benchmark.main(argv) == 0
    (entry,) = json.loads((tmp_path / "count.json").read_text())["cells"]
    assert entry["error"] == "ValueError: budget 40, but image placeholders in the prompt: 41"


def test_check_counts_names_every_count_off_the_budget():
    gpu_benchmark = load_script("gpu_benchmark")
    gpu_benchmark.check_counts(64, {"prompt": 64, "received": 64})
    with pytest.raises(ValueError, match=r"^budget 64, but received: None, planned: 63$"):
        gpu_benchmark.check_counts(64, {"prompt": 64, "received": None, "planned": 63})


def test_a_missing_package_is_named_in_one_line(monkeypatch, capsys):
    gpu_benchmark = load_script("gpu_benchmark")
    monkeypatch.setitem(gpu_benchmark.REQUIRED_PACKAGES, "no_such_package_xyz", "no-such-package")
    assert gpu_benchmark.main(["--device", "cpu", "--tiny"]) == 2
    error = capsys.readouterr().err
    assert error == "gpu_benchmark: missing packages: no-such-package\n"


def test_cuda_without_a_gpu_is_refused_in_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert load_script("gpu_benchmark").main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_wrapper_reaches_the_script():
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--help"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--tiny" in result.stdout and "--budget-s" in result.stdout


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    gpu_benchmark = load_script("gpu_benchmark")
    run_cell = gpu_benchmark.run_cell

    def fail_when_compiled(bench, tokens, native_tokens, batch, mode, args):
        if mode == "compiled":
            raise RuntimeError("no compiler here")
        return run_cell(bench, tokens, native_tokens, batch, mode, args)

    monkeypatch.setattr(gpu_benchmark, "run_cell", fail_when_compiled)
    argv = ["--device", "cpu", "--tiny", "--tokens", "64", "--batch-sizes", "1", "--repeats", "1", "--warmup", "1"]
    assert gpu_benchmark.main([*argv, "--output", str(tmp_path), "--stem", "fail"]) == 0
    eager, compiled = json.loads((tmp_path / "fail.json").read_text())["cells"]
    assert eager["mode"] == "eager" and eager["ttft_ms"] > 0
    assert compiled == {"mode": "compiled", "tokens": 64, "batch": 1, "error": "RuntimeError: no compiler here"}
    assert "failed: RuntimeError: no compiler here" in (tmp_path / "fail.md").read_text()

"""The profiler on tiny models: consistent token counts, FLOPs, stage times, KV cache, outputs;
and the real-size architectures' shapes (built on the meta device, nothing allocated)."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

import pitome_mllm
from pitome_mllm.tools import profiling
from pitome_mllm.tools.profiling import (
    LLMShape,
    MergeTimer,
    PassClock,
    ProfileSettings,
    RunSpec,
    Stopwatch,
    kv_cache_bytes,
    kv_cache_bytes_formula,
    llm_prefill_macs,
    plan_runs,
    profile,
    summarize,
    vision_layer_macs,
    write_report,
)
from pitome_mllm.zoo.architectures import (
    ARCHITECTURES,
    ArchSpec,
    TextShape,
    VisionShape,
    arch_config,
    build_arch,
    count_parameters,
    get_arch,
)

pytestmark = pytest.mark.model_facing

# TEST_SPEC: 112 px / 14 px patches -> 64 patches + CLS, 6 CLIP layers of width 64 (MLP 128);
# Llama with 2 layers, width 64, 4 heads (= kv heads), MLP 128.
NATIVE_TOKENS = 64
EPSILON = 1e-9  # float rounding when adding intervals of one clock


@pytest.fixture(scope="module")
def report(tiny_llava):
    model, processor = tiny_llava
    runs = plan_runs(["tome", "pitome"], budgets=[16, NATIVE_TOKENS], keep_ratios=[0.9], native_tokens=NATIVE_TOKENS)
    settings = ProfileSettings(repeats=2, warmup=1, new_tokens=3, progress=False)
    return profile(model, processor, runs, settings, source="tiny-test")


def by_label(report, label):
    return next(run for run in report.runs if run.label == label)


# ------------------------------------------------------------------------------ runs
def test_plan_runs_maps_native_budget_and_keep_ratio_one_to_the_baseline():
    runs = plan_runs(["none", "pitome"], budgets=[64, 576], keep_ratios=[0.9, 1.0], native_tokens=576)
    assert [run.label for run in runs] == ["unpatched", "none k=64", "pitome k=64", "pitome r=0.9"]
    assert runs[0].overrides is None
    assert runs[2].overrides == {"method": "pitome", "target_tokens": 64, "preset": "reference"}


def test_profile_leaves_the_model_unpatched(report, tiny_llava):
    model, _ = tiny_llava
    assert pitome_mllm.get_patch(model) is None
    assert [run.label for run in report.runs] == ["unpatched", "tome k=16", "tome r=0.9", "pitome k=16", "pitome r=0.9"]


# ---------------------------------------------------------------------- token counts
@pytest.mark.parametrize("label", ["tome k=16", "tome r=0.9", "pitome k=16", "pitome r=0.9"])
def test_token_counts_equal_the_patch_handles(report, tiny_llava, label):
    model, processor = tiny_llava
    run = by_label(report, label)
    with pitome_mllm.patched(model, processor, run.config) as handle:
        steps = handle.schedule
        assert run.visual_tokens == handle.num_visual_tokens == run.visual_tokens_expected
        assert run.tower_tokens_in == [step.tokens_in for step in steps]
        assert run.merge_token_counts == [step.tokens_out for step in steps if step.method != "none"]
    assert run.merge_token_counts == run.merge_token_counts_expected
    # Observed by hooks on every layer; the schedule covers the layers LLaVA reads.
    assert run.observed_layer_tokens[: len(run.tower_tokens_in)] == run.tower_tokens_in
    # The prompt is the same; only the image placeholders shrink.
    assert run.sequence_length == report.runs[0].sequence_length - (NATIVE_TOKENS - run.visual_tokens)


def test_unpatched_run_sees_every_layer_at_full_length(report):
    run = report.runs[0]
    assert run.visual_tokens == NATIVE_TOKENS
    assert run.tower_tokens_in == [NATIVE_TOKENS + 1] * 6
    assert run.observed_layer_tokens == [NATIVE_TOKENS + 1] * 6
    assert run.merge_token_counts == []


# ----------------------------------------------------------------------------- FLOPs
def test_vision_flops_match_a_hand_computation(report):
    # One layer on N=65 tokens, C=64, I=128: 4NC² + 2N²C + 2NCI = 1,064,960 + 540,800 + 1,064,960.
    assert vision_layer_macs(65, 64, 128) == 2_670_720
    # Six layers + patch embedding (64 patches x 3·14² x 64 = 2,408,448); FLOPs = 2 x MACs.
    assert report.runs[0].flops["vision_tower_flops"] == 2 * (6 * 2_670_720 + 2_408_448)


def test_llm_prefill_flops_match_a_hand_computation(report, tiny_llava):
    model, _ = tiny_llava
    vocab = model.config.text_config.vocab_size
    seq = report.runs[0].sequence_length
    # Per token and layer: Q,K,V,O 64·(2·64 + 2·64) = 16,384 and MLP 3·64·128 = 24,576;
    # attention 2·S²·64 per layer; 2 layers; LM head 64·V for the last token.
    macs = 2 * (seq * (16_384 + 24_576) + 2 * seq * seq * 64) + 64 * vocab
    assert report.runs[0].flops["llm_prefill_flops"] == 2 * macs
    shape = LLMShape.from_config(model.config.text_config)
    assert llm_prefill_macs(shape, seq) == macs


def test_flops_decrease_with_fewer_tokens(report):
    runs = sorted(report.runs, key=lambda run: run.visual_tokens)
    for fewer, more in zip(runs, runs[1:], strict=False):
        if fewer.visual_tokens < more.visual_tokens:
            assert fewer.flops["llm_prefill_flops"] < more.flops["llm_prefill_flops"]
            assert fewer.flops["ttft_flops"] < more.flops["ttft_flops"]
    baseline = report.runs[0]
    for run in report.runs[1:]:
        assert run.flops["vision_tower_flops"] < baseline.flops["vision_tower_flops"]
        assert run.speedup["ttft"]["flops"] > 1.0
        assert run.speedup["ttft"]["measured"] > 0


# ------------------------------------------------------------------------ stage times
def test_stage_times_are_positive_and_add_up_to_no_more_than_the_total(report):
    for run in report.runs:
        samples = run.samples
        assert len(samples["ttft"]) == 2
        assert len(samples["decode_per_token"]) == 2 * 2  # 2 passes x (3 new tokens - 1)
        for stage in ("vision_tower", "projector", "llm_prefill", "ttft", "decode_per_token", "total"):
            assert all(value > 0 for value in samples[stage]), stage
        for i in range(2):
            staged = samples["vision_tower"][i] + samples["projector"][i] + samples["llm_prefill"][i]
            assert staged <= samples["ttft"][i] + EPSILON
            assert samples["ttft"][i] + samples["decode_total"][i] <= samples["total"][i] + EPSILON
            assert 0 <= samples["merge_tower"][i] <= samples["vision_tower"][i]
            parts = [samples[f"merge_tower_{part}"][i] for part in ("decide", "apply", "trace")]
            assert sum(parts) == pytest.approx(samples["merge_tower"][i])
            assert 0 <= samples["merge_projector"][i] <= samples["projector"][i]
        stats = run.timings["ttft"]
        assert stats["q1"] <= stats["median"] <= stats["q3"]
    assert all(value == 0 for value in report.runs[0].samples["merge_tower"])
    assert all(value > 0 for value in by_label(report, "pitome r=0.9").samples["merge_tower"])
    assert all(value > 0 for value in by_label(report, "pitome k=16").samples["merge_projector"])


def test_summarize():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats["median"], stats["q1"], stats["q3"], stats["iqr"], stats["n"]) == (3.0, 2.0, 4.0, 2.0, 5)
    assert summarize([]) is None


# -------------------------------------------------------------------------- memory
def test_kv_cache_bytes_match_the_formula(report):
    for run in report.runs:
        # layers x 2 x kv_heads x head_dim x seq x batch x bytes (fp32)
        expected = 2 * 2 * 4 * 16 * run.sequence_length * 1 * 4
        assert run.kv_cache["bytes"] == run.kv_cache["formula_bytes"] == expected
        assert run.kv_cache["sequence_length"] == run.sequence_length
    assert by_label(report, "tome k=16").kv_cache["bytes"] < report.runs[0].kv_cache["bytes"]


def test_kv_cache_bytes_reads_legacy_tuples_and_rejects_unknown_caches():
    key = torch.zeros(1, 2, 5, 8, dtype=torch.float16)
    legacy = ((key, key.clone()), (key.clone(), key.clone()))
    shape = LLMShape(num_layers=2, hidden=16, intermediate=32, num_heads=2, num_kv_heads=2, head_dim=8, vocab_size=10)
    assert kv_cache_bytes(legacy) == kv_cache_bytes_formula(shape, seq_len=5, batch_size=1, bytes_per_value=2)
    with pytest.raises(TypeError, match="cannot read"):
        kv_cache_bytes(object())


def test_memory_is_measured_per_stage(report):
    for run in report.runs:
        assert run.memory["probe"] == "rss"
        for stage in ("vision_tower", "projector", "llm_prefill", "decode"):
            entry = run.memory[stage]
            assert entry["peak_rss_bytes"] > 0
            assert entry["peak_increase_bytes"] >= 0


def test_cuda_memory_probe_bookkeeping(monkeypatch):
    # No GPU here: stand-in allocator statistics exercise the probe's arithmetic.
    state = {"allocated": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=100))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4096)
    probe = profiling.CudaMemoryProbe(torch.device("cuda"))
    probe.begin("vision_tower")
    state["peak"] = 1100
    probe.end("vision_tower")
    assert probe.stages["vision_tower"] == {
        "allocated_before_bytes": 100,
        "peak_allocated_bytes": 1100,
        "peak_reserved_bytes": 4096,
        "peak_increase_bytes": 1000,
    }


def test_cuda_stopwatch_reads_event_pairs(monkeypatch):
    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end):  # milliseconds, as CUDA events report
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    stopwatch = profiling.Stopwatch(torch.device("cuda"))
    start = stopwatch.stamp()
    time.sleep(0.002)
    end = stopwatch.stamp()
    stopwatch.synchronize()
    assert stopwatch.seconds(start, end) > 0


def test_merge_timer_observes_every_stage_without_replacing_the_hooks(tiny_llava, images):
    from pitome_mllm.hooks import tower as vision

    model, processor = tiny_llava
    originals = (vision.decide_step, vision.MergeTrace.apply, vision.TowerMerger._make_merging_forward)
    timer = MergeTimer()
    timer.clock = PassClock(Stopwatch(torch.device("cpu")))
    with pitome_mllm.patched(model, processor, keep_ratio=0.9, target_tokens=20) as handle:
        inputs = processor(images=[images["astronaut"]], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
        observer = handle.add_observer(timer)
        with torch.no_grad():
            model(**inputs)
        steps = sum(step.method != "none" for step in handle.schedule)
        observer.remove()
        with torch.no_grad():
            model(**inputs)  # detached: nothing more is recorded
    intervals = timer.clock.merge_intervals
    assert [len(intervals[kind]) for kind in ("decide", "apply", "trace", "projector")] == [steps, steps, steps, 1]
    assert (vision.decide_step, vision.MergeTrace.apply, vision.TowerMerger._make_merging_forward) == originals


def test_profile_refuses_a_patched_model(tiny_llava):
    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, keep_ratio=0.9), pytest.raises(ValueError, match="unpatched"):
        profile(model, processor, [RunSpec.unpatched()], ProfileSettings(repeats=1, progress=False))


def test_vision_only_profile(tiny_llava):
    model, processor = tiny_llava
    settings = ProfileSettings(repeats=2, warmup=0, vision_only=True, interleave=False, progress=False)
    result = profile(model, processor, plan_runs(["pitome"], keep_ratios=[0.9], native_tokens=64), settings)
    run = result.runs[1]
    assert run.sequence_length is None and run.kv_cache is None
    assert len(run.samples["vision_tower"]) == 2 and run.samples["ttft"] == []
    assert all(
        tower + projector <= total + EPSILON
        for tower, projector, total in zip(
            run.samples["vision_tower"], run.samples["projector"], run.samples["total"], strict=True
        )
    )
    assert set(run.memory) == {"vision_tower", "projector", "probe"}


# -------------------------------------------------------------------------- outputs
def test_report_files_are_written(report, tmp_path):
    paths = write_report(report, tmp_path, stem="tiny")
    assert {path.name for path in paths.values()} == {"tiny.json", "tiny.csv", "tiny_latency.png", "tiny_memory.png"}
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu"]
    assert [run["label"] for run in data["runs"]] == [run.label for run in report.runs]
    with (tmp_path / "tiny.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == [run.label for run in report.runs]
    assert float(rows[0]["ttft_median_ms"]) > 0
    for name in ("tiny_latency.png", "tiny_memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run |" in profiling.markdown_table(report)


def test_publish_report_prints_machine_and_tables_and_writes_files(report, tmp_path, capsys):
    paths = profiling.publish_report(report, tmp_path, "published")
    assert all(path.exists() for path in paths.values())
    printed = capsys.readouterr().out
    assert f"torch {torch.__version__}" in printed and "load average before/after" in printed
    assert "| run |" in printed and "wrote " in printed


def test_cli_profile_on_the_tiny_model(tmp_path, capsys):
    from pitome_mllm.cli import main

    argv = ["profile", "--model", "tiny-test", "--methods", "pitome", "--budgets", "32,64", "--repeats", "1"]
    argv += ["--warmup", "0", "--new-tokens", "2", "--device", "cpu", "--output", str(tmp_path), "--stem", "cli"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "pitome k=32" in captured.out
    # Not a terminal (as when piped into a file): no carriage-return progress bar; the load beside the table.
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "measured with load average" in captured.err
    data = json.loads((tmp_path / "cli.json").read_text())
    assert [run["label"] for run in data["runs"]] == ["unpatched", "pitome k=32"]
    assert data["runs"][1]["visual_tokens"] == 32
    assert (tmp_path / "cli_latency.png").exists() and (tmp_path / "cli.csv").exists()


def test_cli_profile_rejects_unknown_methods(capsys):
    from pitome_mllm.cli import main

    assert main(["profile", "--model", "tiny-test", "--methods", "magic"]) == 2
    assert "--methods" in capsys.readouterr().err


# --------------------------------------------------------------------- architectures
def test_llava_7b_config_numbers():
    config = arch_config("llava-1.5-7b")
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (4096, 14, 336)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (32, 11008, 32064)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")


def test_parameter_counts_of_the_real_shapes():
    counts = count_parameters("llava-1.5-7b")  # on the meta device: nothing allocated
    assert counts["vision_tower"] == 303_507_456  # CLIP ViT-L/14-336 vision model
    assert 6.7e9 < counts["language_model"] < 6.8e9
    assert 12.9e9 < count_parameters("llava-1.5-13b")["language_model"] < 13.1e9
    one_b = get_arch("clip-l-336+1b").text
    assert (one_b.hidden_size, one_b.num_layers, one_b.num_heads, one_b.num_kv_heads) == (2048, 16, 16, 8)
    assert 0.8e9 < count_parameters("clip-l-336+1b")["language_model"] < 1.0e9
    assert set(ARCHITECTURES) == {
        "llava-1.5-7b",
        "llava-1.5-13b",
        "clip-l-336+1b",
        "clip-l-336",
        "qwen2.5-vl-7b",
        "qwen2.5-vl-7b-vision",
        "qwen3-vl-8b",
        "qwen3-vl-8b-vision",
    }


def test_vision_only_arch_builds_on_meta_without_a_language_model():
    model, processor = build_arch("clip-l-336", device="meta")
    core = model.model
    assert core.vision_tower.config.hidden_size == 1024
    assert core.multi_modal_projector.linear_2.out_features == 4096
    assert all(parameter.is_meta for parameter in core.language_model.parameters())
    assert processor.tokenizer.image_token_id < model.config.text_config.vocab_size


def test_small_arch_is_materialised_with_sane_weights_and_buffers():
    spec = ArchSpec(
        "toy",
        "toy",
        VisionShape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=56),
        TextShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=600),
    )
    model, processor = build_arch(spec)
    tower = model.model.vision_tower
    # transformers 4.x keeps the embeddings one level down, on vision_model.
    embeddings = getattr(tower, "vision_model", tower).embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(17).unsqueeze(0))
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.equal(model.model.language_model.norm.weight, torch.ones(32))
    weight = model.model.language_model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(weight.detach().std()) < 0.025
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    settings = ProfileSettings(repeats=1, warmup=0, new_tokens=2, progress=False)
    result = profile(model, processor, plan_runs(["pitome"], budgets=[4], native_tokens=16), settings)
    assert [run.visual_tokens for run in result.runs] == [16, 4]
    assert result.runs[1].kv_cache["bytes"] == result.runs[1].kv_cache["formula_bytes"]


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="known: llava-1.5-7b"):
        get_arch("gpt-5")


# ------------------------------------------------------------------------------ memory before loading
SMALL_ARCH = ArchSpec(
    "small",
    "a small LLaVA-1.5 shape",
    VisionShape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, patch_size=14, image_size=56),
    TextShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=500),
)


@pytest.mark.parametrize("build_language_model", [True, False])
def test_the_parameter_count_is_what_build_arch_builds(build_language_model):
    from dataclasses import replace

    from pitome_mllm.zoo.architecture_specs import parameter_count

    spec = replace(SMALL_ARCH, build_language_model=build_language_model)
    model, _ = build_arch(spec)
    built = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    assert parameter_count(spec) == built


@pytest.mark.parametrize("arch", ["qwen2.5-vl-7b", "qwen2.5-vl-7b-vision", "qwen3-vl-8b", "qwen3-vl-8b-vision"])
def test_the_qwen_parameter_count_is_what_the_model_class_builds(arch):
    """The torch-free count (what profile's memory check uses) equals a meta-device build of the real class."""
    from pitome_mllm.zoo.architecture_specs import estimate_memory, get_arch, parameter_count
    from pitome_mllm.zoo.architectures import count_parameters

    spec = get_arch(arch)
    counts = count_parameters(spec)
    expected = counts["total"] if spec.build_language_model else counts["vision_tower"] + counts["projector"]
    assert parameter_count(spec) == expected
    assert estimate_memory(spec, 2).weight_bytes == 2 * expected


def test_the_llava_7b_estimate_is_its_known_size():
    from pitome_mllm.zoo.architecture_specs import ARCHITECTURES, estimate_memory

    fp32 = estimate_memory(ARCHITECTURES["llava-1.5-7b"], 4)
    assert 7.0e9 < fp32.parameters < 7.1e9  # LLaVA-1.5-7B: 7.06 B parameters
    assert fp32.weight_bytes == 4 * fp32.parameters and 0 < fp32.activation_bytes < fp32.weight_bytes / 10
    assert estimate_memory(ARCHITECTURES["llava-1.5-7b"], 2).total_bytes < fp32.total_bytes / 1.9


def test_profile_refuses_an_arch_that_does_not_fit_before_building_it(monkeypatch, capsys):
    import pitome_mllm.tools.profiling.machine as machine
    import pitome_mllm.zoo.architectures as architectures
    from pitome_mllm.cli import main

    monkeypatch.setattr(machine, "available_memory_bytes", lambda device: 16 * 10**9)  # a 16 GB machine
    monkeypatch.setattr(architectures, "build_arch", lambda *a, **k: pytest.fail("built a model that cannot fit"))
    assert main(["profile", "--arch", "llava-1.5-7b", "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "pitome-mllm profile: error: --arch llava-1.5-7b in float32 needs about 29.4 GB (7.06 B parameters x 4 bytes"
    )
    assert "more than the 16.0 GB available on cpu" in lines[0]
    assert "--dtype bfloat16 or float16 (about 14.8 GB)" in lines[0]
    assert "a smaller --arch: clip-l-336+1b (5.1 GB), clip-l-336 (1.4 GB) in float32" in lines[0]
    # Where even half precision does not fit, it is not offered.
    monkeypatch.setattr(machine, "available_memory_bytes", lambda device: 2 * 10**9)
    assert main(["profile", "--arch", "llava-1.5-7b", "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip()
    assert "--dtype" not in line and "clip-l-336 (1.4 GB)" in line and "clip-l-336+1b" not in line


def test_available_memory_is_read_on_this_machine():
    from pitome_mllm.tools.profiling.machine import available_memory_bytes

    assert available_memory_bytes("cpu") > 0

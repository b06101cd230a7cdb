"""The lmms-eval plugin ``pitome_llava_hf`` on a tiny saved LLaVA, with the offline smoke tasks.

Needs the ``eval`` extra (lmms-eval 0.7.3, see eval/INSTALL.md); skipped without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'pitome-mllm[eval]', eval/INSTALL.md)")

import torch  # noqa: E402
from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402

from pitome_mllm.assets import load_image  # noqa: E402
from pitome_mllm.common.prompts import LLAVA_V1_SYSTEM, build_prompt  # noqa: E402
from pitome_mllm.integrations.lmms_eval.llava_hf import (  # noqa: E402
    PiToMeLlavaHF,
    generation_settings,
    parse_patch_args,
    truncate_at_stop,
)
from pitome_mllm.testing.servers import free_port  # noqa: E402
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_processor  # noqa: E402

pytestmark = pytest.mark.model_facing

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval" / "tasks"
SMOKE_DOCS = 6
# lmms-eval's default `until` for generate_until tasks (the few-shot delimiter).
DEFAULT_UNTIL = ["\n\n"]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def offline_hf_home(tmp_path_factory, monkeypatch):
    """Datasets caches arrow files under HF_HOME; keep them in a temporary folder, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_manager():
    from lmms_eval.tasks import TaskManager

    # Only our tasks: indexing lmms-eval's 300+ task folders is not needed here.
    return TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture
def decord_available(monkeypatch):
    """lmms-eval's built-in llava_hf imports decord (video decoding) at import time.

    decord 0.6.0 installs from PyPI on x86-64 Linux; where it has no wheel, a stub module
    stands in (the image tasks here never decode a video).
    """
    try:
        import decord  # noqa: F401
    except ImportError:
        stub = types.ModuleType("decord")
        stub.VideoReader = object
        stub.cpu = lambda index=0: None
        monkeypatch.setitem(sys.modules, "decord", stub)


def evaluate(task_manager, model: str, model_args: str, task: str = "pitome_smoke", limit=None, **kwargs):
    from lmms_eval import evaluator

    return evaluator.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=task_manager,
        limit=limit,
        log_samples=True,
        device="cpu",
        batch_size=kwargs.pop("batch_size", 1),
        verbosity="WARNING",
        **kwargs,
    )


def responses_by_doc(results, task: str = "pitome_smoke") -> dict[int, str]:
    def text(response):
        while isinstance(response, list):
            response = response[0]
        return response

    return {sample["doc_id"]: text(sample["resps"]) for sample in results["samples"][task]}


def make_instance(request_type: str, arguments: tuple, doc_id: int = 0) -> Instance:
    return Instance(
        request_type=request_type, arguments=arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}
    )


def photo(doc) -> list:
    return [load_image(doc["image"])]


# ---------------------------------------------------------------------------------- registration
def test_entry_point_registers_the_plugin_class():
    from lmms_eval.models import get_model, get_model_manifest

    entry_points = importlib.metadata.entry_points(group="lmms_eval.models")
    values = {entry_point.name: entry_point.value for entry_point in entry_points}
    assert values.get("pitome_llava_hf") == "pitome_mllm.lmms_eval_manifest:manifest"
    manifest = get_model_manifest("pitome_llava_hf")
    assert manifest.simple_class_path == "pitome_mllm.integrations.lmms_eval.llava_hf.PiToMeLlavaHF"
    assert manifest.chat_class_path is None
    model_class = get_model("pitome_llava_hf")
    assert model_class is PiToMeLlavaHF and model_class.is_simple


def test_manifest_module_imports_neither_transformers_nor_lmms_eval():
    # lmms-eval loads all plugin entry points in one try block: a heavy or failing import
    # there would hide every plugin.
    code = (
        "import sys, pitome_mllm.lmms_eval_manifest as m; "
        "print(sorted(name for name in ('transformers', 'lmms_eval') if name in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


# ---------------------------------------------------------------------------------- arguments
def test_patch_args_are_coerced_to_config_types():
    parsed = parse_patch_args(
        {
            "method": "pitome",
            "keep_ratio": 1,  # lmms-eval turns "1" into an int
            "target_tokens": "none",
            "keep_order": "true",
            "metric": "none",
            "prop_attn": False,
            "margin_start": "0.8",
        }
    )
    assert parsed == {
        "method": "pitome",
        "keep_ratio": 1.0,
        "target_tokens": None,
        "keep_order": True,
        "metric": None,
        "prop_attn": False,
        "margin_start": 0.8,
    }
    assert isinstance(parsed["keep_ratio"], float)
    assert parse_patch_args({"method": "none", "target_tokens": 64.0}) == {"method": "none", "target_tokens": 64}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"keep_ratios": 0.9}, "unknown patch arguments"),
        ({"target_tokens": "many"}, "target_tokens must be an integer"),
        ({"keep_order": "maybe"}, "keep_order must be true or false"),
        ({"keep_ratio": "high"}, "keep_ratio must be a number"),
    ],
)
def test_bad_patch_args_name_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        parse_patch_args(args)


def test_invalid_config_fails_before_loading_the_model(tmp_path):
    # The folder does not exist: reaching the loader would raise FileNotFoundError instead.
    with pytest.raises(ValueError, match="needs keep_ratio"):
        PiToMeLlavaHF(pretrained=str(tmp_path / "missing"), method="pitome")
    with pytest.raises(ValueError, match="method must be one of"):
        PiToMeLlavaHF(pretrained=str(tmp_path / "missing"), method="fastv", keep_ratio=0.9)
    with pytest.raises(ValueError, match="prompt_format"):
        PiToMeLlavaHF(pretrained=str(tmp_path / "missing"), method="none", prompt_format="vicuna")


def test_prompt_formats():
    processor = build_tiny_processor(image_size=TEST_SPEC.image_size, patch_size=TEST_SPEC.patch_size)
    question = "What is this?\nAnswer briefly."
    assert build_prompt(processor, question, 1) == f"USER: <image>\n{question} ASSISTANT:"
    # An <image> marker in the context is not doubled: images always go first.
    assert build_prompt(processor, f"<image>\n{question}", 1) == f"USER: <image>\n{question} ASSISTANT:"
    assert build_prompt(processor, question, 2) == f"USER: <image>\n<image>\n{question} ASSISTANT:"
    assert build_prompt(processor, question, 1, "llava_v1") == f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    assert build_prompt(processor, question, 0, "llava_v1") == f"{LLAVA_V1_SYSTEM} USER: {question} ASSISTANT:"


def test_generation_settings_are_greedy_unless_a_temperature_is_given():
    greedy = generation_settings({"until": "###", "max_new_tokens": 16, "temperature": 0, "do_sample": True}, 1024)
    assert greedy.stop_strings == ["###"]
    assert greedy.generate_kwargs == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}
    default = generation_settings({}, 1024)
    assert default.generate_kwargs["max_new_tokens"] == 1024 and default.stop_strings == []
    sampled = generation_settings({"temperature": 0.7, "top_p": 0.9}, 32)
    assert sampled.generate_kwargs["do_sample"] and sampled.generate_kwargs["temperature"] == 0.7
    assert sampled.generate_kwargs["top_p"] == 0.9
    with pytest.raises(ValueError, match="until"):
        generation_settings({"until": 3}, 8)


def test_truncate_at_the_earliest_stop_string():
    assert truncate_at_stop("cat\n\nUSER: dog", ["USER:", "\n\n"]) == "cat"
    assert truncate_at_stop("cat", ["\n\n", ""]) == "cat"


# ---------------------------------------------------------------------------------- generation
def test_method_none_answers_like_lmms_eval_llava_hf(saved_tiny_llava_dir, task_manager, decord_available):
    """Same tiny model, same task prompts: the unpatched plugin reproduces the built-in model.

    ``--model llava_hf`` resolves to lmms-eval's chat class; ``--force_simple`` to the simple
    one; both run batch size 1. The plugin runs batches of 4 (left padding) and honours the
    task's ``until`` stop strings, which llava_hf ignores, so theirs are cut the same way.
    """
    builtin_args = f"pretrained={saved_tiny_llava_dir},device_map=cpu"
    chat = responses_by_doc(evaluate(task_manager, "llava_hf", builtin_args))
    simple = responses_by_doc(evaluate(task_manager, "llava_hf", builtin_args, force_simple=True))
    ours_results = evaluate(
        task_manager, "pitome_llava_hf", f"pretrained={saved_tiny_llava_dir},method=none", batch_size=4
    )
    ours = responses_by_doc(ours_results)

    assert sorted(ours) == list(range(SMOKE_DOCS))
    assert ours == {doc_id: truncate_at_stop(text, DEFAULT_UNTIL) for doc_id, text in chat.items()}
    assert ours == {doc_id: truncate_at_stop(text, DEFAULT_UNTIL) for doc_id, text in simple.items()}
    assert any(text.strip() for text in ours.values())
    for sample in ours_results["samples"]["pitome_smoke"]:
        (cost,) = sample["token_counts"]
        assert cost["visual_tokens"] == TEST_SPEC.num_patches
        assert cost["batch_size"] in (2, 4)  # 6 documents in batches of 4


def test_patched_run_reports_tokens_latency_and_memory(saved_tiny_llava_dir, task_manager, tmp_path):
    record_path = tmp_path / "record.json"
    results = evaluate(
        task_manager,
        "pitome_llava_hf",
        f"pretrained={saved_tiny_llava_dir},method=pitome,target_tokens=16,keep_order=true,record={record_path}",
        limit=3,
        batch_size=2,
    )
    samples = results["samples"]["pitome_smoke"]
    assert len(samples) == 3
    for sample in samples:
        (cost,) = sample["token_counts"]
        assert cost["visual_tokens"] == 16
        assert cost["input_tokens"] > 16 and 1 <= cost["output_tokens"] <= 8  # the task's max_new_tokens
        assert 0 < cost["ttft_s"] <= cost["generation_s"]
    assert "exact_match,none" in results["results"]["pitome_smoke"]
    throughput = results["throughput"]
    assert throughput["avg_visual_tokens"] == 16
    assert throughput["avg_peak_memory_mib"] > 0 and throughput["avg_keep_ratio"] < 1

    record = json.loads(record_path.read_text())
    assert record["samples"] == 3 and record["mean_visual_tokens"] == 16
    assert record["patch"]["num_visual_tokens"] == 16
    assert record["patch"]["config"]["method"] == "pitome" and record["patch"]["config"]["keep_order"] is True
    assert record["memory_kind"] in ("cpu_peak_rss", "cuda_max_memory_allocated") and record["peak_memory_mib"] > 0


@pytest.mark.parametrize(
    "method_args",
    [
        "method=fastervlm",
        "method=visionzip",
        "method=divprune",
        "method=cdpruner",
        "method=pitome,preset=mllm",
        "method=mllm",
    ],
)
def test_the_small_budget_methods_run_through_the_plugin(saved_tiny_llava_dir, task_manager, method_args):
    # cdpruner needs each image's prompt: the plugin's generate calls hand it over (batches of 2).
    results = evaluate(
        task_manager,
        "pitome_llava_hf",
        f"pretrained={saved_tiny_llava_dir},{method_args},target_tokens=16",
        limit=3,
        batch_size=2,
    )
    samples = results["samples"]["pitome_smoke"]
    assert len(samples) == 3
    assert all(sample["token_counts"][0]["visual_tokens"] == 16 for sample in samples)
    assert results["throughput"]["avg_visual_tokens"] == 16


@pytest.fixture(scope="module")
def plugin(saved_tiny_llava_dir):
    """The unpatched plugin, driven directly with hand-made requests."""
    model = PiToMeLlavaHF(pretrained=str(saved_tiny_llava_dir), method="none", device="cpu")
    docs = [{"image": "chelsea", "question": "What is it?"}, {"image": "coffee", "question": "What is it?"}]
    model.task_dict = {"t": {"test": docs}}
    return model


def test_loglikelihood_is_the_continuation_nll_and_flags_the_greedy_token(plugin):
    """Checked against the plain transformers model: one forward over the prompt alone."""
    processor, tokenizer = plugin.processor, plugin.tokenizer
    context = "What is it?"
    prompt = build_prompt(processor, context, 1)
    inputs = processor(images=[load_image("chelsea")], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        next_token_log_probs = plugin.model(**inputs).logits[0, -1].float().log_softmax(-1)
    # Single-token continuations that survive a decode / encode round trip.
    candidates = []
    for token_id in next_token_log_probs.argsort(descending=True).tolist():
        text = tokenizer.decode([token_id])
        if text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]:
            candidates.append((token_id, text))
        if len(candidates) == 3:
            break
    greedy_id = int(next_token_log_probs.argmax())
    requests = [make_instance("loglikelihood", (context, text, photo, 0, "t", "test")) for _, text in candidates]
    results = plugin.loglikelihood(requests)

    assert all(isinstance(result, GenerationResult) for result in results)
    values = [result.text for result in results]
    for (token_id, _), (nll, is_greedy) in zip(candidates, values, strict=True):
        assert nll == pytest.approx(-float(next_token_log_probs[token_id]), abs=1e-4)
        assert is_greedy == (token_id == greedy_id)
    assert values[0][0] < values[1][0] < values[2][0]  # lower is better: lmms-eval takes argmin
    assert results[0].token_counts.visual_tokens == TEST_SPEC.num_patches


def test_loglikelihood_sums_over_continuation_tokens(plugin):
    context, continuation = "What is it?", " a cat on a table"
    (single,) = plugin.loglikelihood([make_instance("loglikelihood", (context, continuation, photo, 0, "t", "test"))])
    nll = single.text[0]
    continuation_ids = plugin.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    assert len(continuation_ids) > 1
    # Teacher forcing token by token must add up to the same total.
    processor = plugin.processor
    prompt = build_prompt(processor, context, 1)
    inputs = processor(images=[load_image("chelsea")], text=[prompt], return_tensors="pt")
    total = 0.0
    input_ids = inputs["input_ids"]
    for token_id in continuation_ids:
        with torch.no_grad():
            logits = plugin.model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=inputs["pixel_values"]
            ).logits
        total -= float(logits[0, -1].float().log_softmax(-1)[token_id])
        input_ids = torch.cat([input_ids, torch.tensor([[token_id]])], dim=1)
    assert nll == pytest.approx(total, rel=1e-4)


def test_multiple_choice_task_ranks_choices_by_loss(saved_tiny_llava_dir, task_manager):
    model_args = f"pretrained={saved_tiny_llava_dir},method=none"
    results = evaluate(task_manager, "pitome_llava_hf", model_args, "pitome_smoke_mc", limit=3)
    samples = results["samples"]["pitome_smoke_mc"]
    assert len(samples) == 3
    for sample in samples:
        values = [float(response[0]) for response in sample["filtered_resps"]]
        choices = sample["doc"]["choices"]
        assert len(values) == len(choices) and all(value > 0 and math.isfinite(value) for value in values)
        predicted = min(range(len(values)), key=values.__getitem__)
        assert sample["acc"] == float(choices[predicted] == sample["target"])
    assert 0.0 <= results["results"]["pitome_smoke_mc"]["acc,none"] <= 1.0


def test_multi_round_feeds_answers_back_until_the_task_stops(plugin):
    seen_previous = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen_previous.append(list(previous_output))
        if round_idx == 1:
            return [load_image("coffee")], "And now?", False, previous_output, {"round": 1}
        assert previous_round_info == {"round": 1}
        return None, None, True, previous_output, None

    gen_kwargs = {"max_new_tokens": 4, "until": []}
    request = make_instance(
        "generate_until_multi_round", ("What is it?", gen_kwargs, photo, doc_to_text, 0, "t", "test")
    )
    (answers,) = plugin.generate_until_multi_round([request])

    assert len(answers) == 2 and seen_previous[0] == answers[:1] and seen_previous[1] == answers
    # The second round is an ordinary request with the round's context and images.
    second = plugin.generate_until(
        [make_instance("generate_until", ("And now?", gen_kwargs, photo, 1, "t", "test"), 1)]
    )
    assert answers[1] == second[0].text


# ---------------------------------------------------------------------------------- real CLI
def test_lmms_eval_cli_runs_the_smoke_task(saved_tiny_llava_dir, tmp_path):
    """``python -m lmms_eval`` end to end. With --verbosity DEBUG a failing evaluation exits
    non-zero (otherwise lmms-eval exits 0), and the results file must hold the metric."""
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "pitome_llava_hf",
        "--model_args",
        f"pretrained={saved_tiny_llava_dir},method=tome,target_tokens=16,device=cpu",
        "--tasks",
        "pitome_smoke",
        "--include_path",
        str(TASKS_DIR),
        "--limit",
        "2",
        "--batch_size",
        "2",
        "--output_path",
        str(output),
        "--log_samples",
        "--verbosity",
        "DEBUG",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    (results_file,) = output.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["pitome_smoke"]["exact_match,none"] <= 1.0
    assert results["throughput"]["avg_visual_tokens"] == 16
    assert "method=tome" in results["config"]["model_args"]
    (samples_file,) = output.rglob("*_samples_pitome_smoke.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2
    assert all(sample["token_counts"][0]["visual_tokens"] == 16 for sample in samples)


# ------------------------------------------------------------------------------ data parallel (accelerate)
def lmms_eval_run(launcher: list[str], model_dir, output) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """The smoke task through ``launcher`` (`-m lmms_eval` follows): the process and each doc's response."""
    command = [
        *launcher,
        "-m",
        "lmms_eval",
        "--model",
        "pitome_llava_hf",
        "--model_args",
        f"pretrained={model_dir},method=tome,target_tokens=16",
        "--tasks",
        "pitome_smoke",
        "--include_path",
        str(TASKS_DIR),
        "--limit",
        "4",
        "--batch_size",
        "1",
        "--output_path",
        str(output),
        "--log_samples",
        "--verbosity",
        "DEBUG",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (samples_file,) = output.rglob("*_samples_pitome_smoke.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert all(sample["token_counts"][0]["visual_tokens"] == 16 for sample in samples)
    return completed, {sample["doc_id"]: (sample["filtered_resps"], sample["exact_match"]) for sample in samples}


def test_two_processes_through_accelerate_answer_as_one_does(saved_tiny_llava_dir, tmp_path):
    """docs/evaluation.md's data-parallel command, on CPU: ``python -m accelerate.commands.launch`` (the
    ``accelerate`` script imports timm, which needs the torchvision a CPU environment lacks) with
    ``--multi_gpu`` (torchrun; the processes talk over gloo without a GPU)."""
    pytest.importorskip("accelerate")
    _, one = lmms_eval_run([sys.executable], saved_tiny_llava_dir, tmp_path / "one")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    completed, two = lmms_eval_run(launcher, saved_tiny_llava_dir, tmp_path / "two")
    log = completed.stdout + completed.stderr
    assert "world_size2" in log  # really two processes, each with its share
    for rank in (0, 1):
        assert f"pitome_llava_hf rank {rank} of 2: 2 samples, visual tokens per image [16]" in log
    assert two == one and len(one) == 4

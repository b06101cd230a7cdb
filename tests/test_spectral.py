"""Spectral distance (pitome_mllm.tools.spectral) and the ``pitome-mllm spectral`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pitome_mllm.cli import main
from pitome_mllm.tools.spectral import (
    SimStep,
    SpectralReference,
    assignment_matrix,
    averaged_coarse_graph,
    cosine_distance_graph,
    gaussian_clusters,
    laplacian_spectrum,
    lifted_graph,
    lifted_spectrum,
    mixed_block_fraction,
    normalized_laplacian,
    plan_steps,
    simulate_merges,
    spectral_distance,
    summed_coarse_graph,
    synthetic_study,
)
from pitome_mllm.tools.viz import curves_size_px


def _clusters(sizes=(12, 8, 6, 3, 1), dim=16, noise=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return gaussian_clusters(sizes, dim, noise, generator)


def _random_partition(num_tokens: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """A token map with exactly ``num_blocks`` non-empty blocks of unequal sizes."""
    generator = torch.Generator().manual_seed(seed)
    token_map = torch.randint(num_blocks, (num_tokens,), generator=generator)
    token_map[:num_blocks] = torch.arange(num_blocks)  # every block used
    return token_map


# ------------------------------------------------------------------ graph basics
def test_cosine_distance_graph_is_symmetric_nonnegative_with_zero_diagonal():
    features, _ = _clusters()
    graph = cosine_distance_graph(features)
    assert graph.dtype == torch.float64
    assert torch.equal(graph, graph.T)
    assert torch.all(graph.diagonal() == 0)
    assert graph.min() >= 0 and graph.max() <= 2
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    off_diagonal = ~torch.eye(len(features), dtype=torch.bool)
    torch.testing.assert_close(graph[off_diagonal], (1 - unit @ unit.T)[off_diagonal])


def test_normalized_laplacian_spectrum_lies_in_zero_two_and_starts_at_zero():
    features, _ = _clusters()
    spectrum = laplacian_spectrum(cosine_distance_graph(features))
    assert torch.all(spectrum[1:] >= spectrum[:-1])  # ascending
    assert abs(spectrum[0].item()) < 1e-10  # a connected graph has one zero eigenvalue
    assert spectrum.max() <= 2 + 1e-10


def test_zero_degrees_are_guarded():
    # Identical directions: every distance is 0, every degree is 0.
    features = torch.ones(6, 4) * torch.arange(1, 7).unsqueeze(1)
    graph = cosine_distance_graph(features)
    assert torch.all(graph == 0)
    laplacian = normalized_laplacian(graph)
    assert torch.isfinite(laplacian).all()
    torch.testing.assert_close(laplacian, torch.eye(6, dtype=torch.float64))
    assert SpectralReference(features).distance(torch.tensor([0, 0, 1, 1, 2, 2])) == pytest.approx(0.0)


# ------------------------------------------------------------ spectral distance
@pytest.mark.parametrize("exact", [False, True])
def test_identity_partition_has_zero_distance(exact):
    features, _ = _clusters()
    identity = torch.arange(len(features))
    assert SpectralReference(features).distance(identity, exact=exact) == pytest.approx(0.0, abs=1e-10)


def test_distance_does_not_depend_on_the_order_of_output_tokens():
    features, _ = _clusters()
    token_map = _random_partition(len(features), 9)
    reference = SpectralReference(features)
    relabel = torch.randperm(9, generator=torch.Generator().manual_seed(3)) * 7 + 100  # new, sparse labels
    original = reference.distance(token_map)
    assert original > 0
    assert reference.distance(relabel[token_map]) == pytest.approx(original, rel=1e-10, abs=1e-12)
    assert reference.distance(relabel[token_map], exact=True) == pytest.approx(original, rel=1e-8, abs=1e-10)


def test_merging_within_clusters_beats_merging_across_clusters():
    sizes = (6, 6, 6, 6)
    features, cluster_id = _clusters(sizes=sizes, dim=32, noise=0.05, seed=1)
    by_cluster = [torch.nonzero(cluster_id == c).flatten() for c in range(len(sizes))]
    # Both partitions: 12 pairs. Within: pairs inside one cluster. Across: each pair spans two clusters.
    within = torch.empty(len(features), dtype=torch.long)
    across = torch.empty(len(features), dtype=torch.long)
    for cluster, members in enumerate(by_cluster):
        for i, token in enumerate(members):
            within[token] = cluster * 3 + i // 2
            across[token] = (cluster // 2) * 6 + i  # cluster 0 pairs with 1, cluster 2 with 3
    assert len(torch.unique(within)) == len(torch.unique(across)) == 12
    assert mixed_block_fraction(within, cluster_id) == 0.0 and mixed_block_fraction(across, cluster_id) == 1.0
    reference = SpectralReference(features)
    assert reference.distance(within) < 0.5 * reference.distance(across)


def test_lifted_spectrum_is_the_summed_coarse_spectrum_plus_ones():
    """Spec 5.4: eig L(W_l) = eig L(C^T W C) plus N - n ones (W_c of Def. 1 averaged)."""
    features, _ = _clusters(dim=8, noise=0.8)
    graph = cosine_distance_graph(features)
    num_tokens, num_blocks = len(features), 11
    token_map = _random_partition(num_tokens, num_blocks, seed=5)

    lifted = laplacian_spectrum(lifted_graph(graph, token_map))
    summed = laplacian_spectrum(summed_coarse_graph(graph, token_map))
    ones = torch.ones(num_tokens - num_blocks, dtype=torch.float64)
    torch.testing.assert_close(lifted, torch.cat([summed, ones]).sort().values, rtol=0, atol=1e-10)
    torch.testing.assert_close(lifted_spectrum(graph, token_map), lifted, rtol=0, atol=1e-10)

    # Not true for the averaged coarse graph itself when the blocks differ in size ...
    averaged = laplacian_spectrum(averaged_coarse_graph(graph, token_map))
    assert (torch.cat([averaged, ones]).sort().values - lifted).abs().max() > 1e-3
    # ... but true when all blocks have the same size (then C^T W C = s^2 W_c).
    equal = torch.arange(num_tokens) // 2
    averaged_equal = laplacian_spectrum(averaged_coarse_graph(graph, equal))
    ones_equal = torch.ones(num_tokens - num_tokens // 2, dtype=torch.float64)
    torch.testing.assert_close(
        torch.cat([averaged_equal, ones_equal]).sort().values,
        laplacian_spectrum(lifted_graph(graph, equal)),
        rtol=0,
        atol=1e-10,
    )


def test_lifted_graph_follows_definitions_1_and_2():
    features, _ = _clusters()
    graph = cosine_distance_graph(features)
    token_map = _random_partition(len(features), 7, seed=2)
    assignment = assignment_matrix(token_map)
    inv_sizes = torch.diag(1 / assignment.sum(0))
    coarse = inv_sizes @ assignment.T @ graph @ assignment @ inv_sizes
    torch.testing.assert_close(averaged_coarse_graph(graph, token_map), coarse)
    torch.testing.assert_close(lifted_graph(graph, token_map), assignment @ coarse @ assignment.T)


def test_batched_distance_matches_per_image_and_per_node_divides_by_n():
    features = torch.stack([_clusters(seed=s)[0] for s in range(3)])
    token_maps = torch.stack([_random_partition(features.shape[1], 10, seed=s) for s in range(3)])
    batched = spectral_distance(features, token_maps)
    assert batched.shape == (3,)
    for i in range(3):
        assert batched[i].item() == pytest.approx(spectral_distance(features[i], token_maps[i]).item())
    per_node = spectral_distance(features, token_maps, per_node=True)
    torch.testing.assert_close(per_node, batched / features.shape[1])


def test_spectral_module_imports_no_transformers():
    code = "import sys, pitome_mllm.tools.spectral; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ simulated merges
def test_simulated_methods_remove_the_same_number_of_tokens():
    features, _ = _clusters(sizes=(20, 10, 5, 3, 2), dim=8)
    counts = {}
    for method in ("pitome", "tome", "random"):
        steps = plan_steps(len(features), method, keep_ratio=0.8, num_steps=4)
        maps = simulate_merges(features.unsqueeze(0), steps, generator=torch.Generator().manual_seed(0))
        counts[method] = [len(torch.unique(m[0])) for m in maps]
    assert counts["pitome"] == counts["tome"] == counts["random"] == [32, 26, 21, 17]


def test_plan_steps_margin_schedule_and_fixed_margin():
    steps = plan_steps(100, "pitome", keep_ratio=0.9, num_steps=4)
    assert [s.margin for s in steps] == pytest.approx([0.9, 0.675, 0.45, 0.225])
    assert all(s.margin == 0.5 for s in plan_steps(100, "pitome", 0.9, 4, margin=0.5))
    with pytest.raises(ValueError, match="method"):
        plan_steps(100, "nope", 0.9, 2)
    with pytest.raises(ValueError, match="method"):
        simulate_merges(torch.randn(1, 8, 4), [SimStep("nope", 1)])


def test_synthetic_study_reports_every_method_per_trial():
    results = synthetic_study(("tome", "pitome"), noise=0.3, cluster_sizes=(20, 8, 4), dim=8, num_steps=3, trials=2)
    assert [r.method for r in results] == ["tome", "pitome"]
    for result in results:
        assert len(result.distances) == 2 and all(len(trial) == 3 for trial in result.distances)
        assert result.tokens_after_step == [28, 24, 21]  # floor(n - 0.85 n) removed per step
        assert all(d >= 0 for d in result.final_distances)


# ------------------------------------------------------------------------- CLI
def test_spectral_cli_synthetic_writes_table_json_and_plot(tmp_path, capsys):
    code = main(
        [
            "spectral",
            "--synthetic",
            "--methods",
            "tome,pitome,random",
            "--noise",
            "0.3",
            "--trials",
            "2",
            "--cluster-sizes",
            "30,10,4,1",
            "--dim",
            "16",
            "--steps",
            "3",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "spectral distance" in capsys.readouterr().out
    report = json.loads((tmp_path / "spectral.json").read_text())
    assert report["mode"] == "synthetic"
    paired = [row for row in report["summary"] if row["method"] == "pitome - tome"]
    assert len(paired) == 1 and paired[0]["n"] == 2
    assert set(report["levels"][0]["methods"]) == {"tome", "pitome", "random"}
    with Image.open(tmp_path / "spectral.png") as image:
        assert image.size == curves_size_px(1)


def test_spectral_cli_on_tiny_model_compares_equal_token_counts(tmp_path, recwarn):
    code = main(
        [
            "spectral",
            "--model",
            "tiny-test",
            "--images",
            "chelsea",
            "--methods",
            "tome,pitome",
            "--keep-ratio",
            "0.9",
            "--random-control",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "spectral.json").read_text())
    budget = report["budgets"][0]
    methods = budget["methods"]
    assert set(methods) == {"tome", "pitome", "random"}
    assert methods["pitome"]["keep_ratio"] == 0.9
    assert report["counts"] == "visual tokens, class token excluded"
    assert not [str(w.message) for w in recwarn if "without its processor" in str(w.message)]
    # Equal counts where the LLM reads, whatever keep ratio it took.
    assert methods["tome"]["tokens_after_layer"][-1] == methods["pitome"]["tokens_after_layer"][-1] == budget["tokens"]
    for data in methods.values():
        curve = data["per_image"]["chelsea"]
        assert len(curve) == len(data["tokens_after_layer"])
        assert all(value >= 0 for value in curve)
    with Image.open(tmp_path / "spectral.png") as image:
        assert image.size == curves_size_px(1)


def test_spectral_cli_rejects_an_unreachable_budget(tmp_path, capsys):
    code = main(["spectral", "--model", "tiny-test", "--budgets", "1000", "--output", str(tmp_path)])
    assert code == 2
    assert "out of range" in capsys.readouterr().err

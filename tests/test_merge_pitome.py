"""One PiToMe step (`pitome_mllm.merge.pitome`, `energy_score`): hand-checked cases,
agreement with the naive reference of ``merge_reference.py``, and properties."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from merge_reference import clustered_tokens, groups_of, pitome_energy_order, reference_pitome
from torch.testing import assert_close

from pitome_mllm.merge import ENERGY_KINDS, energy_score, margin_for_layer, pitome


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run this module's tiny tensor ops on one thread, then restore the setting.

    Hand-offs to a second intra-op thread cost more than they save on tensors this
    small, and on a busy machine (parallel test runs) they cost a lot more.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def energy_tolerance(kind: str, margin: float) -> float:
    """How far two fp32 evaluations of the same energy may drift apart.

    Similarities carry a few ulp (~1e-7) of rounding. The ELU and paper energies pass
    that through with slope <= 1; the Gaussian kernel's slope in ``S`` peaks at about
    ``0.7 / sigma**2`` (``sigma = 1 - margin``), so a narrow kernel amplifies it. Tokens
    closer than this in energy may be ordered either way, and nowhere else may the
    library's order differ from the reference's.
    """
    if kind == "gaussian":
        return 1e-6 + 1e-7 / (1.0 - margin) ** 2
    return 1e-6


def unit_angle(theta: float) -> list[float]:
    """A unit vector in the xy-plane at angle ``theta`` (radians)."""
    return [math.cos(theta), math.sin(theta), 0.0]


def index_tensors(step) -> list[torch.Tensor]:
    return [step.kept_idx, step.dst_idx, step.src_idx, step.src_dst_pos]


def assert_same_plan(step, other) -> None:
    assert step.num_input_tokens == other.num_input_tokens
    for mine, theirs in zip(index_tensors(step), index_tensors(other), strict=True):
        assert torch.equal(mine, theirs)


# --------------------------------------------------------------- hand cases
# Four tokens of one cluster in the xy-plane and two isolated tokens near +z and -z.
# Token 1 (+z) has cosine exactly 0 with the cluster, so it shifts every cluster energy
# equally; the cluster ranking then follows the summed cosines to the other members:
#   theta 0.15 -> 3.956 (highest energy), 0.10 -> 3.949, 0.00 -> 3.905, 0.40 -> 3.845.
# Token 4 is -z tilted by 0.1 towards theta 0.4: its cosines with the cluster (0.092 to
# 0.1, all below the margin) barely move the cluster energies (by < 0.01 of a gap) but
# lift its own energy above token 1's. Both isolated tokens see only themselves above
# the margin, so they are the two lowest: ... 4, 1.
TILT = 0.1
HAND_VECTORS = [
    unit_angle(0.40),  # 0: cluster, 4th
    [0.0, 0.0, 1.0],  # 1: isolated, 6th
    unit_angle(0.10),  # 2: cluster, 2nd
    unit_angle(0.00),  # 3: cluster, 3rd
    [TILT * math.cos(0.4), TILT * math.sin(0.4), -math.sqrt(1 - TILT**2)],  # 4: isolated, 5th
    unit_angle(0.15),  # 5: cluster, 1st
]
HAND_ENERGY_ORDER = [5, 2, 3, 0, 4, 1]
HAND_MARGIN = 0.5


def hand_metric(with_class_token: bool = False) -> torch.Tensor:
    """``[1, 6, 3]`` (or ``[1, 7, 3]`` with a class token in front)."""
    rows = ([unit_angle(0.12)] if with_class_token else []) + HAND_VECTORS
    return torch.tensor([rows])


def hand_features(num_tokens: int) -> torch.Tensor:
    """``[1, N, 2]`` features ``(i, 10 i)``: a group's mean names its members."""
    index = torch.arange(num_tokens, dtype=torch.float32)
    return torch.stack([index, 10 * index], dim=-1).unsqueeze(0)


def group_means(groups: list[list[int]]) -> torch.Tensor:
    """``[1, len(groups), 2]`` the mean of `hand_features` over each group."""
    return torch.tensor([[[sum(g) / len(g), 10 * sum(g) / len(g)] for g in groups]])


@pytest.mark.parametrize("kind", ENERGY_KINDS)
def test_hand_energy_ranking(kind):
    energies = energy_score(hand_metric(), HAND_MARGIN, kind=kind)[0].tolist()
    assert sorted(range(6), key=lambda i: -energies[i]) == HAND_ENERGY_ORDER


@pytest.mark.parametrize("kind", ENERGY_KINDS)
def test_hand_r2_merges_cluster_into_its_core(kind):
    # Mergeable = top 4 = [5, 2, 3, 0]; A = [5, 3], B = [2, 0]; protected = [4, 1].
    # 5 (theta .15) and 3 (theta 0) are both closer to 2 (theta .1) than to 0 (theta .4).
    step = pitome(hand_metric(), r=2, margin=HAND_MARGIN, energy=kind)
    assert step.kept_idx.tolist() == [[4, 1]]
    assert step.dst_idx.tolist() == [[2, 0]]
    assert step.src_idx.tolist() == [[5, 3]]
    assert step.output_position.tolist() == [[3, 1, 2, 2, 0, 2]]
    assert_close(step(hand_features(6)), group_means([[4], [1], [2, 3, 5], [0]]))


def test_hand_r1_protects_all_but_the_top_pair():
    # Mergeable = [5, 2]: 5 merges into 2; protected in descending energy: [3, 0, 4, 1].
    step = pitome(hand_metric(), r=1, margin=HAND_MARGIN)
    assert step.output_position.tolist() == [[1, 3, 4, 0, 2, 4]]
    assert_close(step(hand_features(6)), group_means([[3], [0], [4], [1], [2, 5]]))


def test_hand_max_r_merges_every_a_token():
    # r = 3 = n // 2: A = [5, 3, 4], B = [2, 0, 1]; nothing is protected. Token 4 is an
    # A token too and goes to its most similar B: token 0 (cosine 0.1, the tilt).
    step = pitome(hand_metric(), r=3, margin=HAND_MARGIN)
    assert step.num_kept == 0
    assert step.output_position.tolist() == [[1, 2, 0, 0, 1, 0]]
    assert_close(step(hand_features(6)), group_means([[2, 3, 5], [0, 4], [1]]))
    with pytest.raises(ValueError, match="r=4.*3"):
        pitome(hand_metric(), r=4, margin=HAND_MARGIN)


def test_hand_class_token_is_left_out_and_first():
    step = pitome(hand_metric(with_class_token=True), r=2, margin=HAND_MARGIN, class_token=True)
    assert step.output_position.tolist() == [[0, 4, 2, 3, 3, 1, 3]]
    assert_close(step(hand_features(7)), group_means([[0], [5], [2], [3, 4, 6], [1]]))
    with pytest.raises(ValueError, match="r=4.*3"):
        pitome(hand_metric(with_class_token=True), r=4, margin=HAND_MARGIN, class_token=True)


def test_all_duplicates_follow_position_order():
    # Eight identical tokens: every energy is exactly 0.5 (alpha = 0), every A-B cosine is
    # exactly 1. Stable order: A = [0, 2, 4], B = [1, 3, 5], protected = [6, 7]; all A
    # tokens pick the first B.
    metric = torch.zeros(1, 8, 4)
    metric[..., 0] = 1.0
    step = pitome(metric, r=3, margin=0.5, alpha=0.0)
    assert step.kept_idx.tolist() == [[6, 7]]
    assert step.dst_idx.tolist() == [[1, 3, 5]]
    assert step.output_position.tolist() == [[2, 2, 2, 3, 2, 4, 0, 1]]


# ------------------------------------------------------------------- energy
@pytest.mark.parametrize("cosine", [0.6, 0.2])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_energy_of_two_tokens(cosine, alpha):
    # Each token's energy is the mean of f(1) (itself) and f(cosine) (the other).
    metric = torch.tensor([[[1.0, 0.0], [cosine, math.sqrt(1 - cosine**2)]]])
    margin, sigma = 0.5, 0.5

    def below(s):
        return alpha * (math.exp(s - margin) - 1)

    expected = {
        "elu": ((1 - margin) + (cosine - margin if cosine > margin else below(cosine))) / 2,
        "paper": (1 + (cosine if cosine >= margin else below(cosine))) / 2,
        "gaussian": (1 + 2 * math.exp(-(((1 - cosine) / sigma) ** 2)) - 1) / 2 / (sigma * math.sqrt(2 * math.pi)),
    }
    for kind, value in expected.items():
        energies = energy_score(metric, margin, alpha=alpha, kind=kind)
        assert energies.dtype == torch.float32 and energies.shape == (1, 2)
        assert_close(energies, torch.full((1, 2), value), rtol=0, atol=1e-6, msg=kind)


def test_energy_is_scale_invariant_and_fp32():
    metric = clustered_tokens(2, 17, 8, num_clusters=3)
    scaled = energy_score(8 * metric.half(), 0.3)  # a power of two: exact in fp16
    assert scaled.dtype == torch.float32
    assert_close(scaled, energy_score(metric.half().float(), 0.3), rtol=0, atol=1e-6)


def test_margin_for_layer():
    margins = [margin_for_layer(i, 24) for i in range(24)]
    assert margins[0] == 0.9 and margins[1] == pytest.approx(0.8625) and margins[23] == pytest.approx(0.0375)
    assert all(a > b for a, b in pairwise(margins))  # decreasing with depth
    assert margin_for_layer(6, 12, start=0.75, span=0.75) == pytest.approx(0.375)


# ------------------------------------------------------ reference agreement
def check_against_reference(metric, r, margin, alpha, class_token, energy, features=None):
    """Decide with the library and the reference; the plans must agree exactly.

    The library's energy order must sort the reference energies (to fp32 rounding);
    given that order, groups, output order and merged values must be identical.
    """
    step = pitome(metric, r, margin, alpha=alpha, class_token=class_token, energy=energy)
    own = reference_pitome(metric, r, margin, alpha, class_token, energy)

    offset = 1 if class_token else 0
    ref_energies = torch.tensor(own.energies, dtype=torch.float64)
    tolerance = energy_tolerance(energy, margin)
    library_energies = energy_score(metric[:, offset:], margin, alpha, energy).double()
    assert_close(library_energies, ref_energies, rtol=0, atol=tolerance)
    if r == 0:
        reference = own
    else:
        lib_order = pitome_energy_order(step, class_token)
        in_lib_order = ref_energies.gather(1, torch.tensor(lib_order))
        descending = ref_energies.sort(dim=1, descending=True).values
        assert_close(in_lib_order, descending, rtol=0, atol=tolerance)
        reference = (
            own
            if lib_order == own.orders
            else reference_pitome(metric, r, margin, alpha, class_token, energy, order=lib_order)
        )
    assert groups_of(step) == (reference.leads, reference.groups)
    assert step.num_output_tokens == metric.shape[1] - r

    if features is None:
        features = torch.randn(metric.shape[0], metric.shape[1], 5, generator=torch.Generator().manual_seed(1))
    assert_close(step(features), reference.reduce(features), rtol=1e-5, atol=1e-6)
    return step, reference


# The Gaussian kernel has no alpha.
ENERGY_ALPHA = [
    ("elu", 0.0),
    ("elu", 0.5),
    ("elu", 1.0),
    ("paper", 0.0),
    ("paper", 0.5),
    ("paper", 1.0),
    ("gaussian", 1.0),
]


@pytest.mark.parametrize(("energy", "alpha"), ENERGY_ALPHA)
@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("num_tokens", [9, 17, 64, 197])
def test_agrees_with_reference(num_tokens, class_token, energy, alpha):
    metric = clustered_tokens(2, num_tokens, 16, num_clusters=max(2, num_tokens // 12), seed=num_tokens)
    graph_tokens = num_tokens - int(class_token)
    for r, layer in zip(sorted({0, 1, graph_tokens // 4, graph_tokens // 2}), (0, 6, 13, 22), strict=False):
        check_against_reference(metric, r, margin_for_layer(layer, 24), alpha, class_token, energy)


@pytest.mark.parametrize("energy", ENERGY_KINDS)
@pytest.mark.parametrize("class_token", [False, True])
def test_agrees_with_reference_clip_length(class_token, energy):
    metric = clustered_tokens(2, 577, 16, num_clusters=40, seed=577)
    graph_tokens = 577 - int(class_token)
    for r in (57, graph_tokens // 2):
        check_against_reference(metric, r, 0.45, 1.0, class_token, energy)


def test_agrees_with_reference_clip_large_width():
    metric = clustered_tokens(1, 577, 1024, num_clusters=30, spread=0.5, seed=1024)
    check_against_reference(metric, 57, margin_for_layer(13, 24), 1.0, True, "elu", features=metric)


@pytest.mark.parametrize("reduce", ["sum", "amax", "amin", "prune"])
def test_reduce_modes_match_reference(reduce):
    metric = clustered_tokens(2, 33, 8, num_clusters=3, seed=3)
    features = torch.randn(2, 33, 6, generator=torch.Generator().manual_seed(4))
    step, reference = check_against_reference(metric, 12, 0.3, 1.0, True, "elu")
    assert_close(step(features, reduce=reduce), reference.reduce(features, reduce), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_token", [False, True])
def test_zero_r_is_identity(dtype, class_token):
    metric = clustered_tokens(2, 17, 8, num_clusters=3).to(dtype)
    step = pitome(metric, 0, 0.5, class_token=class_token)
    for reduce in ("mean", "sum", "amax", "prune"):
        assert torch.equal(step(metric, reduce=reduce), metric)
    merged, size = step.weighted(metric)
    assert torch.equal(merged, metric) and torch.equal(size, torch.ones_like(metric[..., :1]))
    assert step.output_position.tolist() == [list(range(17))] * 2


def test_class_token_never_merged_even_as_a_duplicate():
    # The class token duplicates the highest-energy cluster: inside the graph it would merge.
    metric = clustered_tokens(2, 25, 8, num_clusters=2, spread=0.05, num_isolated=0, seed=5)
    metric[:, 0] = metric[:, 1]
    features = torch.randn(2, 25, 3)
    for r in range(1, 13):
        step = pitome(metric, r, 0.5, class_token=True)
        position = step.output_position
        assert step.kept_idx[:, 0].tolist() == [0, 0]
        assert position[:, 0].tolist() == [0, 0]
        assert (position[:, 1:] != 0).all()
        assert torch.equal(step(features)[:, 0], features[:, 0])


@pytest.mark.parametrize("class_token", [False, True])
def test_every_input_lands_in_exactly_one_output(class_token):
    metric = clustered_tokens(3, 64, 8, num_clusters=5, seed=6)
    for r in (1, 10, 31 + int(not class_token)):
        step = pitome(metric, r, 0.2, class_token=class_token)
        every = torch.cat([step.kept_idx, step.dst_idx, step.src_idx], dim=1).sort(dim=1).values
        assert torch.equal(every, torch.arange(64).expand(3, 64))
        counts = torch.zeros(3, 64 - r, dtype=torch.long).scatter_add_(
            1, step.output_position, torch.ones(3, 64, dtype=torch.long)
        )
        assert (counts >= 1).all()  # onto 0 .. N - r - 1
        assert counts.sum(dim=1).tolist() == [64] * 3


def test_weighted_conserves_mass_and_size():
    metric = clustered_tokens(2, 40, 8, num_clusters=4, seed=7)
    features = torch.randn(2, 40, 5, dtype=torch.float64)
    size = torch.randint(1, 6, (2, 40, 1)).double()
    step = pitome(metric, 15, 0.4, class_token=True)
    merged, new_size = step.weighted(features, size)
    assert merged.shape == (2, 25, 5) and new_size.shape == (2, 25, 1)
    assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))
    assert_close((merged * new_size).sum(dim=1), (features * size).sum(dim=1))
    _, unit_size = step.weighted(features)
    assert unit_size.sum().item() == 2 * 40


def test_batch_items_are_independent():
    metric = clustered_tokens(3, 64, 8, num_clusters=5, seed=8)
    batched = pitome(metric, 20, 0.3, class_token=True)
    for item in range(3):
        solo = pitome(metric[item : item + 1], 20, 0.3, class_token=True)
        for mine, theirs in zip(index_tensors(batched), index_tensors(solo), strict=True):
            assert torch.equal(mine[item : item + 1], theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("energy", ENERGY_KINDS)
def test_low_precision_metric_decides_like_fp32(dtype, energy):
    metric = clustered_tokens(2, 65, 16, num_clusters=6, seed=9).to(dtype)
    low = pitome(metric, 20, 0.45, class_token=True, energy=energy)
    full = pitome(metric.float(), 20, 0.45, class_token=True, energy=energy)
    assert_same_plan(low, full)
    assert low(metric).dtype == dtype


@pytest.mark.parametrize("seed", range(4))
def test_equal_energy_ties_are_broken_by_position(seed):
    # Duplicated basis vectors with alpha = 0 and margin 0.5: every energy is a dyadic
    # count (0.5 * cluster size / n), so same-size clusters tie exactly. Any shuffle of
    # the tokens must give the reference's "lower position first" plan, every time.
    cluster_of = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4])
    generator = torch.Generator().manual_seed(seed)
    batch = torch.stack([cluster_of[torch.randperm(12, generator=generator)] for _ in range(2)])
    metric = torch.nn.functional.one_hot(batch, 5).float()
    for r in (2, 4, 6):
        step = pitome(metric, r, 0.5, alpha=0.0)
        reference = reference_pitome(metric, r, 0.5, alpha=0.0)
        assert groups_of(step) == (reference.leads, reference.groups)
        assert_same_plan(step, pitome(metric.clone(), r, 0.5, alpha=0.0))


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("r", "fragments"),
    [
        (-1, ["-1", "8"]),
        (9, ["9", "8"]),
        (100, ["100", "8"]),
        (1.5, ["1.5", "8"]),
        (True, ["True", "8"]),
        (float("inf"), ["inf", "8"]),
        (float("nan"), ["nan", "8"]),
        (None, ["None", "8"]),
        ("2", ["'2'", "8"]),
    ],
)
def test_bad_r_is_rejected(r, fragments):
    metric = torch.randn(1, 17, 4)  # 16 graph tokens with the class token: r <= 8
    with pytest.raises(ValueError) as error:
        pitome(metric, r, 0.5, class_token=True)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_integral_float_r_is_accepted():
    metric = torch.randn(1, 17, 4)
    assert pitome(metric, 4.0, 0.5, class_token=True).num_removed == 4


@pytest.mark.parametrize(
    "metric",
    [torch.randn(17, 4), torch.randn(1, 2, 17, 4), torch.ones(1, 17, 4, dtype=torch.long), [[0.0, 1.0]]],
    ids=["2d", "4d", "integer", "list"],
)
def test_bad_metric_is_rejected(metric):
    with pytest.raises(ValueError, match="metric"):
        pitome(metric, 1, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"energy": "cosine"}, "cosine"),
        ({"energy": "gaussian", "margin": 1.0}, "1.0"),
        ({"alpha": -0.5}, "-0.5"),
        ({"margin": float("nan")}, "nan"),
    ],
)
def test_bad_energy_arguments_are_rejected(kwargs, fragment):
    arguments = {"margin": 0.5} | kwargs
    with pytest.raises(ValueError, match=fragment):
        pitome(torch.randn(1, 9, 4), 2, **arguments)

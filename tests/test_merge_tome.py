"""One bipartite-soft-matching step (`pitome_mllm.merge.bipartite_soft_matching`):
hand-checked cases, agreement with the naive reference, and properties."""

from __future__ import annotations

import math

import pytest
import torch
from merge_reference import clustered_tokens, groups_of, reference_bsm
from torch.testing import assert_close

from pitome_mllm.merge import bipartite_soft_matching


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


def index_tensors(step) -> list[torch.Tensor]:
    return [step.kept_idx, step.dst_idx, step.src_idx, step.src_dst_pos]


def basis(*weights: float) -> list[float]:
    """A 4-d vector from its coordinates (padded with zeros)."""
    return list(weights) + [0.0] * (4 - len(weights))


# --------------------------------------------------------------- hand cases
# Seven tokens in 4-d; A = positions 0, 2, 4, 6 and B = positions 1, 3, 5.
#   B: 1 = e1, 3 = e2, 5 = e3.
#   A: 0 = e3 (a copy of 5; the class token when there is one),
#      2 = e3 (best: 5, cosine 1), 4 = 0.9 e1 + sqrt(.19) e4 (best: 1, cosine 0.9),
#      6 = 0.3 e2 + sqrt(.91) e4 (best: 3, cosine 0.3).
HAND_METRIC = torch.tensor(
    [
        [
            basis(0, 0, 1),
            basis(1),
            basis(0, 0, 1),
            basis(0, 1),
            basis(0.9, 0, 0, math.sqrt(0.19)),
            basis(0, 0, 1),
            basis(0, 0.3, 0, math.sqrt(0.91)),
        ]
    ]
)


def hand_features() -> torch.Tensor:
    """``[1, 7, 2]`` features ``(i, 10 i)``: a group's mean names its members."""
    index = torch.arange(7, dtype=torch.float32)
    return torch.stack([index, 10 * index], dim=-1).unsqueeze(0)


def group_means(groups: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[[sum(g) / len(g), 10 * sum(g) / len(g)] for g in groups]])


@pytest.mark.parametrize(
    ("r", "groups"),
    [
        (1, [[0], [4], [6], [1], [3], [2, 5]]),  # the best edge: 2 -> 5 (cosine 1)
        (2, [[0], [6], [1, 4], [3], [2, 5]]),  # then 4 -> 1 (cosine 0.9)
        (3, [[0], [1, 4], [3, 6], [2, 5]]),  # then 6 -> 3 (cosine 0.3); the class token stays
    ],
)
def test_hand_with_class_token(r, groups):
    step = bipartite_soft_matching(HAND_METRIC, r, class_token=True)
    leads, found = groups_of(step)
    assert found == [groups]
    assert leads[0][: step.num_kept] == [g[0] for g in groups[: step.num_kept]]  # unmerged A in position order
    assert step.dst_idx.tolist() == [[1, 3, 5]]  # every B, in position order
    assert_close(step(hand_features()), group_means(groups))
    with pytest.raises(ValueError, match="r=4.*3"):
        bipartite_soft_matching(HAND_METRIC, 4, class_token=True)


def test_hand_without_class_token_ties_go_to_the_lower_position():
    # Tokens 0 and 2 both reach token 5 with cosine exactly 1: token 0 comes first.
    step = bipartite_soft_matching(HAND_METRIC, 1)
    assert groups_of(step)[1] == [[[2], [4], [6], [1], [3], [0, 5]]]
    step = bipartite_soft_matching(HAND_METRIC, 4)  # ceil(7 / 2): every A token merges
    assert groups_of(step)[1] == [[[1, 4], [3, 6], [0, 2, 5]]]
    assert_close(step(hand_features()), group_means([[1, 4], [3, 6], [0, 2, 5]]))


def test_all_duplicates_merge_in_position_order():
    # Identical tokens: every A-B cosine is exactly 1, so every best B is the first (1) and
    # the r merged A tokens are the first r.
    metric = torch.zeros(1, 8, 3)
    metric[..., 1] = 2.0
    step = bipartite_soft_matching(metric, 3)
    assert groups_of(step)[1] == [[[6], [0, 1, 2, 4], [3], [5], [7]]]


# ------------------------------------------------------ reference agreement
def check_against_reference(metric, r, class_token, features=None):
    step = bipartite_soft_matching(metric, r, class_token=class_token)
    reference = reference_bsm(metric, r, class_token)
    assert groups_of(step) == (reference.leads, reference.groups)
    assert step.num_output_tokens == metric.shape[1] - r
    if features is None:
        features = torch.randn(metric.shape[0], metric.shape[1], 5, generator=torch.Generator().manual_seed(2))
    assert_close(step(features), reference.reduce(features), rtol=1e-5, atol=1e-6)
    return step, reference


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("num_tokens", [9, 17, 64, 197, 577])
def test_agrees_with_reference(num_tokens, class_token):
    metric = clustered_tokens(2, num_tokens, 16, num_clusters=max(2, num_tokens // 12), seed=num_tokens)
    max_r = math.ceil(num_tokens / 2) - int(class_token)
    for r in sorted({0, 1, max_r // 3, max_r}):
        check_against_reference(metric, r, class_token)


def test_agrees_with_reference_clip_large_width():
    metric = clustered_tokens(1, 577, 1024, num_clusters=30, spread=0.5, seed=1024)
    check_against_reference(metric, 57, True, features=metric)


@pytest.mark.parametrize("reduce", ["sum", "amax", "amin", "prune"])
def test_reduce_modes_match_reference(reduce):
    metric = clustered_tokens(2, 33, 8, num_clusters=3, seed=3)
    features = torch.randn(2, 33, 6, generator=torch.Generator().manual_seed(4))
    step, reference = check_against_reference(metric, 12, True)
    assert_close(step(features, reduce=reduce), reference.reduce(features, reduce), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_r_is_identity(dtype):
    metric = clustered_tokens(2, 17, 8, num_clusters=3).to(dtype)
    step = bipartite_soft_matching(metric, 0, class_token=True)
    for reduce in ("mean", "sum", "amax", "prune"):
        assert torch.equal(step(metric, reduce=reduce), metric)
    assert step.output_position.tolist() == [list(range(17))] * 2


def test_class_token_never_merged_even_as_a_duplicate():
    metric = clustered_tokens(2, 24, 8, num_clusters=2, spread=0.05, num_isolated=0, seed=5)
    metric[:, 0] = metric[:, 1]  # cosine 1 with a B token: the best edge if it could merge
    features = torch.randn(2, 24, 3)
    for r in range(1, 12):
        step = bipartite_soft_matching(metric, r, class_token=True)
        assert step.kept_idx[:, 0].tolist() == [0, 0]
        assert step.output_position[:, 0].tolist() == [0, 0]
        assert (step.output_position[:, 1:] != 0).all()
        assert torch.equal(step(features)[:, 0], features[:, 0])
    assert 0 in bipartite_soft_matching(metric, 1).src_idx[0].tolist()  # without the flag it does merge


@pytest.mark.parametrize("class_token", [False, True])
def test_output_order_and_coverage(class_token):
    metric = clustered_tokens(3, 65, 8, num_clusters=5, seed=6)
    for r in (1, 11, 33 - int(class_token)):
        step = bipartite_soft_matching(metric, r, class_token=class_token)
        assert torch.equal(step.kept_idx, step.kept_idx.sort(dim=1).values)  # unmerged A in position order
        assert (step.kept_idx % 2 == 0).all() and (step.src_idx % 2 == 0).all()
        assert step.dst_idx.tolist() == [list(range(1, 65, 2))] * 3
        every = torch.cat([step.kept_idx, step.dst_idx, step.src_idx], dim=1).sort(dim=1).values
        assert torch.equal(every, torch.arange(65).expand(3, 65))
        hit = torch.zeros(3, 65 - r, dtype=torch.bool).scatter_(1, step.output_position, True)
        assert hit.all()  # onto 0 .. N - r - 1


def test_weighted_conserves_mass_and_size():
    metric = clustered_tokens(2, 40, 8, num_clusters=4, seed=7)
    features = torch.randn(2, 40, 5, dtype=torch.float64)
    size = torch.randint(1, 6, (2, 40, 1)).double()
    merged, new_size = bipartite_soft_matching(metric, 19, class_token=True).weighted(features, size)
    assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))
    assert_close((merged * new_size).sum(dim=1), (features * size).sum(dim=1))


def test_batch_items_are_independent():
    metric = clustered_tokens(3, 64, 8, num_clusters=5, seed=8)
    batched = bipartite_soft_matching(metric, 20, class_token=True)
    for item in range(3):
        solo = bipartite_soft_matching(metric[item : item + 1], 20, class_token=True)
        for mine, theirs in zip(index_tensors(batched), index_tensors(solo), strict=True):
            assert torch.equal(mine[item : item + 1], theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_metric_decides_like_fp32(dtype):
    metric = clustered_tokens(2, 65, 16, num_clusters=6, seed=9).to(dtype)
    low = bipartite_soft_matching(metric, 25, class_token=True)
    full = bipartite_soft_matching(metric.float(), 25, class_token=True)
    for mine, theirs in zip(index_tensors(low), index_tensors(full), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("seed", range(4))
def test_equal_scores_are_broken_by_position(seed):
    # One-hot tokens: every cosine is exactly 0 or 1, so scores tie in bulk. Any shuffle
    # must give the reference's "lower position first" plan, every time.
    cluster_of = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 2])
    generator = torch.Generator().manual_seed(seed)
    batch = torch.stack([cluster_of[torch.randperm(13, generator=generator)] for _ in range(2)])
    metric = torch.nn.functional.one_hot(batch, 5).float()
    for r in (1, 3, 6):
        step = bipartite_soft_matching(metric, r, class_token=True)
        reference = reference_bsm(metric, r, class_token=True)
        assert groups_of(step) == (reference.leads, reference.groups)
        again = bipartite_soft_matching(metric.clone(), r, class_token=True)
        for mine, theirs in zip(index_tensors(step), index_tensors(again), strict=True):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize(
    ("num_tokens", "class_token", "max_r"),
    [(1, False, 0), (2, False, 1), (2, True, 0), (3, True, 1), (8, False, 4), (8, True, 3), (577, True, 288)],
)
def test_largest_r(num_tokens, class_token, max_r):
    metric = torch.randn(1, num_tokens, 4)
    step = bipartite_soft_matching(metric, max_r, class_token=class_token)
    assert step.num_output_tokens == num_tokens - max_r
    with pytest.raises(ValueError, match=f"r={max_r + 1}.*{max_r}"):
        bipartite_soft_matching(metric, max_r + 1, class_token=class_token)


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("r", "fragments"),
    [(-2, ["-2", "8"]), (9, ["9", "8"]), (2.5, ["2.5", "8"]), (False, ["False", "8"]), (float("inf"), ["inf", "8"])],
)
def test_bad_r_is_rejected(r, fragments):
    metric = torch.randn(1, 17, 4)  # 9 A tokens, one the class token: r <= 8
    with pytest.raises(ValueError) as error:
        bipartite_soft_matching(metric, r, class_token=True)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize("metric", [torch.randn(17, 4), torch.ones(1, 17, 4, dtype=torch.int32)], ids=["2d", "integer"])
def test_bad_metric_is_rejected(metric):
    with pytest.raises(ValueError, match="metric"):
        bipartite_soft_matching(metric, 1)

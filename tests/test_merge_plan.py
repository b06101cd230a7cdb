"""The `Merge` index plan: applying it, size and source tracking, composing steps."""

from __future__ import annotations

import pytest
import torch
from merge_reference import clustered_tokens, groups_of
from torch.testing import assert_close

from pitome_mllm.merge import REDUCE_MODES, Merge, bipartite_soft_matching, identity_merge, pitome, source_matrix


def hand_plan() -> Merge:
    """Two items of six tokens, each reduced to four.

    Item 0: output = [x4, x0, x1, {x3, x2, x5}]   (both sources into the second destination)
    Item 1: output = [x0, x5, {x2, x1}, {x4, x3}]
    """
    return Merge(
        kept_idx=torch.tensor([[4, 0], [0, 5]]),
        dst_idx=torch.tensor([[1, 3], [2, 4]]),
        src_idx=torch.tensor([[2, 5], [1, 3]]),
        src_dst_pos=torch.tensor([[1, 1], [0, 1]]),
        num_input_tokens=6,
    )


HAND_GROUPS = [[[4], [0], [1], [2, 3, 5]], [[0], [5], [1, 2], [3, 4]]]


def hand_features() -> torch.Tensor:
    """``[2, 6, 2]``: item 0 holds ``(i, -i)``, item 1 ``(10 i, i^2)``."""
    index = torch.arange(6, dtype=torch.float32)
    return torch.stack([torch.stack([index, -index], -1), torch.stack([10 * index, index**2], -1)])


def reduce_groups(x: torch.Tensor, groups, how) -> torch.Tensor:
    return torch.stack([torch.stack([how(x[item, g]) for g in item_groups]) for item, item_groups in enumerate(groups)])


def test_sizes_and_positions():
    plan = hand_plan()
    assert (plan.num_removed, plan.num_output_tokens, plan.num_kept, plan.batch_size) == (2, 4, 2, 2)
    assert plan.output_position.tolist() == [[1, 2, 3, 3, 0, 3], [0, 2, 2, 3, 3, 1]]
    assert groups_of(plan)[1] == HAND_GROUPS


@pytest.mark.parametrize(
    ("reduce", "how"),
    [
        ("mean", lambda t: t.mean(dim=0)),  # the destination counts as one member of its group
        ("sum", lambda t: t.sum(dim=0)),
        ("amax", lambda t: t.max(dim=0).values),
        ("amin", lambda t: t.min(dim=0).values),
    ],
)
def test_reduce_modes(reduce, how):
    x = hand_features()
    assert_close(hand_plan()(x, reduce=reduce), reduce_groups(x, HAND_GROUPS, how))


def test_prune_keeps_destinations_unchanged():
    x = hand_features()
    leads = [[4, 0, 1, 3], [0, 5, 2, 4]]
    expected = torch.stack([x[item, leads[item]] for item in range(2)])
    assert torch.equal(hand_plan()(x, reduce="prune"), expected)


def test_mean_by_hand():
    out = hand_plan()(hand_features())
    assert_close(out[0], torch.tensor([[4, -4], [0, 0], [1, -1], [10 / 3, -10 / 3]]))
    assert_close(out[1], torch.tensor([[0, 0], [50, 25], [15, 2.5], [35, 12.5]]))


def test_apply_keeps_dtype_and_leaves_input_alone():
    x = hand_features().to(torch.bfloat16)
    before = x.clone()
    assert hand_plan()(x).dtype == torch.bfloat16
    assert torch.equal(x, before)


def test_weighted_by_hand():
    x = hand_features()
    size = torch.tensor([[1.0, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1]]).unsqueeze(-1)
    merged, new_size = hand_plan().weighted(x, size)
    # Item 0, last group {2, 3, 5} with sizes {3, 4, 6}: (3*2 + 4*3 + 6*5) / 13 = 48 / 13.
    assert new_size.squeeze(-1).tolist() == [[5, 1, 2, 13], [1, 1, 2, 2]]
    assert_close(merged[0, 3], torch.tensor([48 / 13, -48 / 13]))
    assert_close(merged[1], hand_plan()(x[1:2].expand(2, -1, -1))[1])  # unit sizes: the plain mean


def test_identity_plan():
    plan = identity_merge(3, 5)
    x = torch.randn(3, 5, 4)
    assert plan.num_removed == 0 and plan.num_output_tokens == 5
    for reduce in REDUCE_MODES:
        assert torch.equal(plan(x, reduce=reduce), x)
    assert plan.output_position.tolist() == [list(range(5))] * 3
    assert torch.equal(plan.track_source(), torch.arange(5).expand(3, 5))


def test_to_device_keeps_the_plan():
    moved = hand_plan().to("cpu")
    assert moved.num_input_tokens == 6
    assert torch.equal(moved(hand_features()), hand_plan()(hand_features()))


def test_source_matrix_by_hand():
    token_map = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert source_matrix(token_map, 2).tolist() == [[[0, 1, 0], [1, 0, 1]], [[1, 1, 1], [0, 0, 0]]]


def test_track_source_first_step_is_a_copy():
    plan = hand_plan()
    token_map = plan.track_source()
    assert torch.equal(token_map, plan.output_position)
    token_map[:] = 0  # the caller owns it: the plan's own positions must not change
    assert plan.output_position.tolist() == [[1, 2, 3, 3, 0, 3], [0, 2, 2, 3, 3, 1]]


def merge_chain(x: torch.Tensor, class_token: bool = True):
    """Four steps (BSM, PiToMe, BSM, PiToMe), each deciding on the previous step's output.

    Returns the plans and the features after each step (plain mean).
    """
    plans, states = [], [x]
    for layer, method in enumerate(["bsm", "pitome", "bsm", "pitome"]):
        current = states[-1]
        r = (current.shape[1] - 1) // 5
        if method == "bsm":
            plan = bipartite_soft_matching(current, r, class_token=class_token)
        else:
            plan = pitome(current, r, margin=0.9 - 0.2 * layer, class_token=class_token)
        plans.append(plan)
        states.append(plan(current))
    return plans, states


def test_track_source_composes_like_source_matrices():
    x = clustered_tokens(2, 50, 8, num_clusters=4, seed=11)
    plans, _ = merge_chain(x)
    token_map = None
    dense = torch.eye(50).expand(2, 50, 50)
    for plan in plans:
        token_map = plan.track_source(token_map)
        step_matrix = source_matrix(plan.output_position, plan.num_output_tokens)  # [B, n_out, n_in]
        dense = step_matrix @ dense
    assert token_map.shape == (2, 50)
    assert torch.equal(source_matrix(token_map, plans[-1].num_output_tokens), dense)
    assert (token_map[:, 0] == 0).all()  # the class token is still alone at index 0
    assert (token_map[:, 1:] != 0).all()


def test_weighted_chain_is_the_mean_over_original_tokens():
    # With sizes tracked, every output token after any number of steps is the mean of
    # the original tokens it holds, and its size is how many those are.
    x = clustered_tokens(2, 50, 8, num_clusters=4, seed=12).double()
    plans, _ = merge_chain(x.float())
    features, size, token_map = x, None, None
    for plan in plans:
        features, size = plan.weighted(features, size)
        token_map = plan.track_source(token_map)
    source = source_matrix(token_map, plans[-1].num_output_tokens).double()  # [B, n, 50]
    assert torch.equal(size.squeeze(-1), source.sum(dim=-1))
    assert_close(features, (source @ x) / source.sum(dim=-1, keepdim=True))


@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 6, 3), (2, 6), (2, 6, 3, 1)])
def test_wrong_input_shape_is_rejected(shape):
    with pytest.raises(ValueError, match=r"B=2, N=6"):
        hand_plan()(torch.zeros(shape))


def test_unknown_reduce_is_rejected():
    with pytest.raises(ValueError, match="median"):
        hand_plan()(hand_features(), reduce="median")

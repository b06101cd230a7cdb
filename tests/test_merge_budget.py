"""`pitome_mllm.merge.merge_to_budget`: the one loop that merges a token set down to an exact budget."""

from __future__ import annotations

import pytest
import torch

from pitome_mllm.merge import merge_to_budget

pytestmark = pytest.mark.model_facing


def start(batch: int = 2, num_tokens: int = 50, channels: int = 16, seed: int = 0):
    features = torch.randn(batch, num_tokens, channels, generator=torch.Generator().manual_seed(seed))
    size = torch.ones(batch, num_tokens, 1)
    token_map = torch.arange(num_tokens).expand(batch, num_tokens).clone()
    return features, size, token_map


@pytest.mark.parametrize("method", ["pitome", "tome"])
@pytest.mark.parametrize("target", [49, 25, 10, 3, 1])
def test_lands_on_the_budget_and_every_token_is_held_once(method, target):
    features, size, token_map = start()
    merged, merged_size, merged_map = merge_to_budget(features, size, token_map, target, method=method, margin=0.5)
    assert merged.shape == (2, target, 16) and merged_size.shape == (2, target, 1)
    assert torch.equal(merged_size.sum(dim=(1, 2)), torch.full((2,), 50.0))
    # The map says where each original token went; the sizes count them.
    counts = torch.zeros(2, target).scatter_add_(1, merged_map, torch.ones(2, 50))
    assert torch.equal(counts, merged_size.squeeze(-1))


@pytest.mark.parametrize("target", [None, 50, 80])
def test_a_budget_at_or_above_the_count_changes_nothing(target):
    features, size, token_map = start()
    merged, merged_size, merged_map = merge_to_budget(features, size, token_map, target)
    assert merged is features and merged_size is size and merged_map is token_map


def test_zero_tokens_hands_on_nothing_and_holds_no_patch():
    features, size, token_map = start()
    merged, merged_size, merged_map = merge_to_budget(features, size, token_map, 0)
    assert merged.shape == (2, 0, 16) and merged_size.shape == (2, 0, 1)
    assert bool((merged_map == -1).all())


def test_size_weighted_keeps_the_weighted_sum():
    features, size, token_map = start(seed=1)
    size = size * torch.randint(1, 4, size.shape).float()
    merged, merged_size, _ = merge_to_budget(features, size, token_map, 7, reduce="size_weighted", margin=0.5)
    torch.testing.assert_close((merged * merged_size).sum(dim=1), (features * size).sum(dim=1), rtol=1e-5, atol=1e-4)


def test_an_unknown_method_is_refused():
    features, size, token_map = start()
    with pytest.raises(ValueError, match=r"method must be one of \('pitome', 'tome'\), got 'bsm'"):
        merge_to_budget(features, size, token_map, 10, method="bsm")

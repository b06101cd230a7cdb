"""Reducing one image's tokens, given as a sequence, to an exact count: the merged-grid stage.

Towers that hand the language model one sequence per image whose length depends on the image
(Qwen2.5-VL / Qwen3-VL: the patch merger's output, images of a batch concatenated, not stacked)
are reduced image by image. Each kept token records the first cell (raster order) of the tokens
it holds, which is where the language model's positions come from, and the kept tokens are put
in raster order of those cells. Tensors that hold the same cells (Qwen3-VL's DeepStack features)
are reduced with the same plan: the same groups with the same weights, or the same rows kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..methods import method_spec
from .budget import StepParams, merge_to_budget_carrying
from .reducers import ReductionInputs, reduce_to_budget


@dataclass(frozen=True)
class ReducedImage:
    """One image's tokens after the stage.

    Attributes:
        tokens: ``[K, D]`` in raster order of ``first_cells``.
        carried: each ``[K, D_i]``, the carried tensors reduced the same way, same order.
        first_cells: ``[K]`` the smallest original cell index each kept token holds (increasing).
        cell_tokens: ``[N]`` the kept token (index into ``tokens``) holding each original cell, ``-1`` where
            the cell was dropped (a merge map: which cells each kept token holds).
    """

    tokens: torch.Tensor
    carried: tuple[torch.Tensor, ...]
    first_cells: torch.Tensor
    cell_tokens: torch.Tensor | None = None


def first_cells(token_map: torch.Tensor, num_kept: int) -> torch.Tensor:
    """``[K]`` the smallest original index each kept token holds, from a ``[N]`` map (``-1``: dropped).

    Every kept token holds at least one original token in the maps the reducers make.
    """
    num_original = token_map.shape[0]
    held = token_map >= 0
    first = torch.full((num_kept,), num_original, dtype=torch.long, device=token_map.device)
    original_index = torch.arange(num_original, device=token_map.device)
    return first.scatter_reduce(0, token_map[held], original_index[held], reduce="amin", include_self=True)


def reordered_token_map(token_map: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``[N]`` map to the kept tokens once they are put in ``order`` (``[K]``: old index of each new one)."""
    new_index = torch.empty_like(order)
    new_index[order] = torch.arange(order.shape[0], device=order.device)
    return torch.where(token_map >= 0, new_index[token_map.clamp_min(0)], -1)


def reduce_image_tokens(
    tokens: torch.Tensor,
    num_kept: int,
    method: str,
    step: StepParams,
    seed: int = 0,
    carried: tuple[torch.Tensor, ...] = (),
) -> ReducedImage:
    """Reduce one image's ``tokens`` (``[N, D]``, raster order of its cells) to ``num_kept``.

    ``method``: ``"none"`` keeps everything; ``"pitome"`` / ``"tome"`` merge (the steps of
    ``step``, each removing at most half, decided on ``tokens``); a selection method of
    `pitome_mllm.methods` that needs neither class attention nor a prompt (``random``,
    ``divprune``) keeps rows. ``carried`` tensors (``[N, D_i]``, same cells) follow the same plan.

    ``num_kept >= N`` returns the inputs themselves (bit for bit).
    """
    num_tokens = tokens.shape[0]
    if num_kept >= num_tokens or method == "none":
        every_cell = torch.arange(num_tokens, device=tokens.device)
        return ReducedImage(tokens, carried, every_cell, every_cell)
    spec = method_spec(method)
    if spec.implementation is None:
        return _merged(tokens, num_kept, replace(step, method=method), carried)
    kept, token_map = reduce_to_budget(
        spec.implementation,
        ReductionInputs(tokens[None], num_kept, seed=seed, projected=tokens[None] if spec.after_projector else None),
    )
    cells = first_cells(token_map[0], kept.shape[1])
    order = cells.argsort()
    # A selection keeps rows: each kept token is the original token at its first (only) cell.
    return ReducedImage(
        kept[0][order],
        tuple(tensor[cells[order]] for tensor in carried),
        cells[order],
        reordered_token_map(token_map[0], order),
    )


def _merged(tokens: torch.Tensor, num_kept: int, step: StepParams, carried: tuple[torch.Tensor, ...]) -> ReducedImage:
    """PiToMe / ToMe steps down to ``num_kept``, then raster order."""
    num_tokens = tokens.shape[0]
    size = torch.ones(1, num_tokens, 1, device=tokens.device)
    token_map = torch.arange(num_tokens, device=tokens.device)[None]
    merged, _, token_map, merged_carried = merge_to_budget_carrying(
        step, tokens[None], size, token_map, num_kept, tuple(tensor[None] for tensor in carried)
    )
    cells = first_cells(token_map[0], merged.shape[1])
    order = cells.argsort()
    return ReducedImage(
        merged[0][order],
        tuple(tensor[0][order] for tensor in merged_carried),
        cells[order],
        reordered_token_map(token_map[0], order),
    )


__all__ = ["ReducedImage", "first_cells", "reduce_image_tokens", "reordered_token_map"]

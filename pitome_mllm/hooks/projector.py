"""The projector stage: a last merge on the projected visual tokens, and order restore.

Runs as a forward hook on the projector (a per-token MLP in LLaVA), so the language
model receives exactly ``target_tokens`` tokens per image, optionally back in raster
order. The tower's `MergeTrace` supplies token sizes (for size-weighted merging) and
the source map (for raster order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..merge import pitome
from .vision import MergeTrace, TowerMerger, raster_order


@dataclass(frozen=True)
class ProjectorSettings:
    """Attributes:
    target_tokens: tokens per image after this stage (None: keep what the tower gives).
    keep_order: sort the tokens by the first patch each one holds.
    dropped_leading: leading tower tokens the model drops before the projector
        (1 when LLaVA drops the class token, else 0).
    margin, alpha, energy: of the PiToMe step(s).
    reduce: ``"mean"`` or ``"size_weighted"``.
    """

    target_tokens: int | None
    keep_order: bool
    dropped_leading: int
    margin: float
    alpha: float
    energy: str
    reduce: str


def reduce_to_budget(
    features: torch.Tensor, size: torch.Tensor, token_map: torch.Tensor, settings: ProjectorSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiToMe steps on ``features`` (``[B, n, D]``) until ``target_tokens`` remain.

    One step removes at most half of the tokens, so a budget below ``n / 2`` takes
    several steps. ``size`` is ``[B, n, 1]`` and ``token_map`` ``[B, N0]`` (indices into
    the ``n`` tokens); both are carried along.
    """
    target = settings.target_tokens
    while target is not None and features.shape[1] > target:
        num_tokens = features.shape[1]
        r = min(num_tokens - target, num_tokens // 2)
        step = pitome(features, r, settings.margin, alpha=settings.alpha, energy=settings.energy)
        if settings.reduce == "size_weighted":
            features, _ = step.weighted(features, size.to(features.dtype))
        else:
            features = step(features, reduce="mean")
        size = step(size, reduce="sum")
        token_map = step.track_source(token_map)
    return features, size, token_map


class ProjectorMerger:
    """Forward hook on a projector that applies `ProjectorSettings`."""

    def __init__(self, projector: nn.Module, tower: TowerMerger, settings: ProjectorSettings) -> None:
        self.projector = projector
        self.tower = tower
        self.settings = settings
        self.final_token_map: torch.Tensor | None = None
        self.final_size: torch.Tensor | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def active(self) -> bool:
        return self.settings.target_tokens is not None or self.settings.keep_order

    def install(self) -> None:
        # Always installed: it also records the final source map for analysis.
        self._hook = self.projector.register_forward_hook(self._on_output)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.final_token_map = None
        self.final_size = None

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        trace: MergeTrace | None = self.tower.trace
        if trace is None or output.dim() != 3 or trace.size.shape[0] != output.shape[0]:
            return None  # not a call that followed a tower forward (e.g. a user calling it alone)
        drop = self.settings.dropped_leading
        size = trace.size[:, drop:]
        # Original tokens dropped with the class token are left out of the map.
        token_map = trace.token_map[:, drop:] - drop
        if size.shape[1] != output.shape[1]:
            return None
        features, size, token_map = reduce_to_budget(output, size, token_map, self.settings)
        if self.settings.keep_order:
            order = raster_order(token_map, features.shape[1])
            features = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
            size = size.gather(1, order.unsqueeze(-1))
            inverse = order.argsort(dim=1)
            token_map = inverse.gather(1, token_map)
        self.final_token_map = token_map
        self.final_size = size
        return features if self.active else None

"""The merged-grid stage for vLLM's own Qwen2.5-VL (``vllm.model_executor.models.qwen2_5_vl``), from the config alone.

The transformers adapter (`pitome_mllm.models.qwen_vl`) defines the merge, the counts and the positions;
vLLM must give the same. Three things meet here, none of them importing vLLM:

- counts (`QwenVllmPlan.kept_tokens`): vLLM expands every ``<|image_pad|>`` before the encoder runs,
  so each image's placeholders are the budget of its native count, `MergedGridBudget.kept_tokens`;
- the merge (`QwenVllmPlan.reduce`): each image's merger output reduced by `reduce_image_tokens`
  with the transformers adapter's method and step parameters (`image_stage_settings`);
- positions (M-RoPE): which cells a merged token holds is known only after the encoder, so they are
  made in two steps, as in transformers. Before the encoder (`reduced_mrope_positions`) an image's
  ``K`` placeholders are numbered as its first ``K`` cells and the text after it continues from the
  image's full grid (so text, ``rope_deltas`` and decoding never depend on the merge); in the forward
  that places the image (`move_to_cells`) every image token moves to the first cell it holds. The
  cells travel with the embeddings as extra channels (`append_cells`), because vLLM caches encoder
  outputs and may place one image over several prefill chunks.

vLLM's own pruning contract (``SupportsMultiModalPruning.recompute_mrope_positions``) is not used: its
model runner calls it only when ``video_pruning_rate`` is set (the CPU build's runner never), and it
renumbers the text after a pruned image from the kept tokens, where the transformers adapter keeps
the unpatched text positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PiToMeConfig
from ..geometry import MergedGridBudget
from ..merge.budget import StepParams
from ..merge.sequence import ReducedImage, reduce_image_tokens
from .qwen_vl import QwenVLAdapter, cell_offsets, image_stage_settings, merged_grid_budget
from .vllm_llava import check_vllm_config

# Cells travel as base-128 digit pairs: every digit is an integer below 256, exact in bfloat16 and float16.
CELL_BASE = 128
# (t, h, w) offsets, two digits each.
CELL_CHANNELS = 6
QWEN_VIDEO_REFUSED = (
    "pitome_mllm merges the images of Qwen-VL in vLLM; videos are not supported while hf_overrides['pitome'] is "
    "set (their positions and counts would not follow the image plan). Start the engine with "
    "limit_mm_per_prompt={'image': N, 'video': 0}, or drop the 'pitome' key for videos"
)
FULL_CUDAGRAPH_REFUSED = (
    "pitome_mllm's Qwen-VL plugin does not support full CUDA graphs (cudagraph_mode={mode}): the image tokens' "
    "M-RoPE positions are moved in the model's forward, which a replayed full graph skips (vLLM runs a batch of "
    "one-token steps, e.g. a one-token prefill chunk beside decodes, as a full graph). Start the engine with "
    "compilation_config={{'cudagraph_mode': 'PIECEWISE'}} (or enforce_eager=True)"
)
PIPELINE_REFUSED = (
    "pitome_mllm's Qwen-VL plugin does not support pipeline parallelism: the image tokens' M-RoPE positions are "
    "moved to the cells they hold in the stage that embeds the images, and later stages would not see it. Use "
    "pipeline_parallel_size=1 (tensor parallelism is supported)"
)


@dataclass(frozen=True)
class ImageRun:
    """One image's placeholders in a prompt.

    Attributes:
        offset: index of its first placeholder.
        grid: ``(t, h, w)`` its merged grid (patch grid divided by the merge size).
        kept: placeholders it holds (its budget).
    """

    offset: int
    grid: tuple[int, int, int]
    kept: int


def reduced_mrope_positions(length: int, runs: list[ImageRun]) -> tuple[torch.Tensor, int]:
    """``([3, length] positions, delta)`` of a prompt whose images hold ``kept`` placeholders each.

    Text is numbered as the model's rule numbers it with full images (after an image, from its start
    + its largest offset + 1), so every text token has its unpatched position; an image's ``K``
    placeholders take its first ``K`` cells (moved to the cells they hold in the forward, `move_to_cells`).
    ``delta``: next position minus ``length`` (decoding continues from the full grid, as in transformers).
    """
    pieces: list[torch.Tensor] = []
    start = next_position = 0
    for run in sorted(runs, key=lambda run: run.offset):
        text = run.offset - start
        pieces.append(torch.arange(text).expand(3, text) + next_position)
        origin = next_position + text
        cells = cell_offsets(run.grid, torch.arange(run.grid[0] * run.grid[1] * run.grid[2]))
        pieces.append(cells[:, : run.kept] + origin)
        next_position = origin + int(cells.max()) + 1
        start = run.offset + run.kept
    if start < length:
        pieces.append(torch.arange(length - start).expand(3, length - start) + next_position)
        next_position += length - start
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions, next_position - length


def append_cells(tokens: torch.Tensor, grid: tuple[int, int, int], cells: torch.Tensor) -> torch.Tensor:
    """``tokens`` (``[K, D]``) with the `CELL_CHANNELS` that give the ``(t, h, w)`` offset of the cell each holds."""
    offsets = cell_offsets(grid, cells.to(tokens.device)).T  # [K, 3]
    digits = torch.stack((offsets // CELL_BASE, offsets % CELL_BASE), dim=-1).reshape(-1, CELL_CHANNELS)
    return torch.cat((tokens, digits.to(tokens.dtype)), dim=1)


def split_cells(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`append_cells` undone: ``([K, D] tokens, [3, K] cell offsets)``."""
    digits = embeddings[:, -CELL_CHANNELS:].round().long().reshape(-1, 3, 2)
    return embeddings[:, :-CELL_CHANNELS], (digits[..., 0] * CELL_BASE + digits[..., 1]).T


def move_to_cells(positions: torch.Tensor, is_image: torch.Tensor, offsets: torch.Tensor) -> None:
    """Move the image tokens of one forward (in place) from their first-K numbering to the cells they hold.

    Args:
        positions: ``[3, T]`` the forward's M-RoPE positions (`reduced_mrope_positions` of each prompt's tokens).
        is_image: ``[T']`` (``T' <= T``) which tokens take image embeddings, in the order of ``offsets``.
        offsets: ``[3, M]`` the ``(t, h, w)`` offset of the cell each of the ``M`` image tokens holds.

    A still image is one frame, so every token of it is numbered ``origin`` in the temporal row
    whichever cell it was given; it moves to ``origin + offsets``.

    Raises:
        RuntimeError: the mask and the embeddings disagree in number.
    """
    targets = is_image.nonzero().flatten()
    if targets.shape[0] != offsets.shape[1]:
        raise RuntimeError(
            f"pitome_mllm: {offsets.shape[1]} image embeddings in this forward, but {targets.shape[0]} image "
            "positions; the merged counts and vLLM's placement disagree"
        )
    origin = positions[0, targets]
    positions[:, targets] = origin + offsets.to(positions.device, positions.dtype)


@dataclass(frozen=True)
class QwenVllmPlan:
    """Counts and merge of a Qwen2.5-VL config patched with ``config`` (the transformers adapter's own).

    Attributes:
        budget: each image's budget (`MergedGridBudget`; only its kept count of a native count is read).
        method, step, seed: how each image's merged-grid tokens are reduced (`image_stage_settings`).
        merge_size: the patch merger's block side.
        main_channels: the merger's output width; vLLM's Qwen3-VL tower appends its DeepStack levels after them.
    """

    budget: MergedGridBudget
    method: str
    step: StepParams
    seed: int
    merge_size: int
    main_channels: int

    @classmethod
    def from_config(cls, hf_config, config: PiToMeConfig) -> QwenVllmPlan:
        """The plan of a ``Qwen2_5_VLConfig`` patched with ``config``.

        Raises:
            ValueError: settings Qwen-VL or vLLM cannot run (the messages `pitome_mllm.patch` gives).
        """
        check_vllm_config(config)
        QwenVLAdapter.check_supported(config)
        vision_config = hf_config.vision_config
        method, step = image_stage_settings(config, vision_config.depth)
        budget = merged_grid_budget(vision_config, config)
        merge_size, main_channels = vision_config.spatial_merge_size, vision_config.out_hidden_size
        return cls(budget, method, step, config.seed, merge_size, main_channels)

    def kept_tokens(self, native_tokens: int) -> int:
        return self.budget.kept_tokens(native_tokens)

    def merged_grid(self, grid_thw) -> tuple[int, int, int]:
        """``(t, h, w)`` merged grid of patch grid ``grid_thw``."""
        t, h, w = (int(value) for value in grid_thw)
        return t, h // self.merge_size, w // self.merge_size

    def reduce(self, features: torch.Tensor, grid_thw) -> ReducedImage:
        """One image's tower output ``[n, C]`` (raster order) reduced to its budget.

        Channels after ``main_channels`` (Qwen3-VL's DeepStack levels, ``[n, C - D]``) are carried: merged with
        the same weights, or the same rows kept, as in transformers.

        Raises:
            RuntimeError: the tower gave another count than the image's grid has cells.
        """
        grid = self.merged_grid(grid_thw)
        native = grid[0] * grid[1] * grid[2]
        if features.shape[0] != native:
            raise RuntimeError(
                f"vLLM's Qwen-VL tower gave {features.shape[0]} tokens for a merged grid {grid} of {native} cells"
            )
        main, carried = features, ()
        if self.main_channels < features.shape[1]:
            main, carried = features[:, : self.main_channels], (features[:, self.main_channels :],)
        return reduce_image_tokens(main, self.kept_tokens(native), self.method, self.step, self.seed, carried)


def tower_calls(patches_per_image: list[int], budget_patches: int) -> list[slice]:
    """Consecutive groups of images whose patches add up to at most ``budget_patches`` (one image at least).

    vLLM sizes encoder work by the placeholders, the merged count; the tower still sees every patch.
    """
    groups, start, total = [], 0, 0
    for index, patches in enumerate(patches_per_image):
        if index > start and total + patches > budget_patches:
            groups.append(slice(start, index))
            start, total = index, 0
        total += patches
    if start < len(patches_per_image):
        groups.append(slice(start, len(patches_per_image)))
    return groups


__all__ = [
    "CELL_CHANNELS",
    "ImageRun",
    "QWEN_VIDEO_REFUSED",
    "QwenVllmPlan",
    "append_cells",
    "FULL_CUDAGRAPH_REFUSED",
    "PIPELINE_REFUSED",
    "move_to_cells",
    "reduced_mrope_positions",
    "split_cells",
    "tower_calls",
]

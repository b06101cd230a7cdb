"""Merge maps: which image patches end up in the same token, and the energy that decided it.

Two entry points:

* `visualize` runs a model through the patch API (``handle.record_merges``) and draws,
  for every method (rows) and chosen vision layer (columns), the groups of patches
  that share a token after that layer, plus a row of PiToMe energy maps.
* `merge_maps_from_tokens` + `plot_merge_maps` do the same for a plain token set and
  a list of simulated steps, without any model (docs and tests).

A merge map paints every group with the mean colour of its patches (or a hashed
palette), draws group boundaries, and outlines tokens that still hold a single patch
(protected or not yet merged). Nothing here knows a model family: models are reached
through `pitome_mllm.patch` and the model's own image encoding (its adapter's `ModelParts`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..merge import Merge, energy_score, margin_for_layer
from .spectral import SimStep, simulate_merges

COLOUR_MODES = ("mean", "palette")
BOUNDARY_RGB = (0.0, 0.0, 0.0)
SINGLETON_RGB = (1.0, 0.84, 0.0)  # yellow outline: a token that still holds one patch
DROPPED_RGB = (0.15, 0.15, 0.15)  # a cell no kept token holds (a selection method dropped it)
RANDOM_WEIGHTS_NOTE = (
    "random-weight model: groups follow pixel statistics pushed through a random network, not semantics"
)


# ------------------------------------------------------------------ geometry
def patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid of a ``height x width`` image cut into ``num_patches``."""
    patch = math.sqrt(height * width / num_patches)
    rows, cols = round(height / patch), round(width / patch)
    if rows * cols != num_patches:
        raise ValueError(f"{num_patches} patches do not tile a {height}x{width} image into square patches")
    return rows, cols


# ---------------------------------------------------------------- pure maps
def merge_maps_from_tokens(
    features: torch.Tensor,
    steps: Sequence[SimStep],
    grid: tuple[int, int] | None = None,
    reduce: str = "size_weighted",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Merge maps of a token set through ``steps`` (no model, no class token).

    Args:
        features: ``[N, C]`` or ``[B, N, C]`` tokens, in raster order of a patch grid.
        steps: the merge steps (`pitome_mllm.tools.spectral.plan_steps` builds a schedule).
        grid: ``(rows, cols)`` with ``rows * cols = N``; default square.
        reduce, generator: as in `pitome_mllm.tools.spectral.simulate_merges`.

    Returns:
        One ``[B, rows, cols]`` (or ``[rows, cols]`` for unbatched input) map per step:
        the token holding each patch.
    """
    single = features.dim() == 2
    batch = features.unsqueeze(0) if single else features
    num_tokens = batch.shape[1]
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens are not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
    maps = [m.view(-1, *grid) for m in simulate_merges(batch, steps, reduce=reduce, generator=generator)]
    return [m[0] for m in maps] if single else maps


def energy_map(patch_features: torch.Tensor, margin: float, grid: tuple[int, int], energy: str = "elu") -> torch.Tensor:
    """PiToMe energy of every patch, as a grid.

    Args:
        patch_features: ``[N, C]`` features of the patches (class token removed), e.g.
            one layer's output of the unmerged tower.
        margin: the energy margin of that layer.
        grid: ``(rows, cols)``.

    Returns:
        ``[rows, cols]`` fp32 energies (high: a near-duplicate of many patches, merged first).
    """
    return energy_score(patch_features.unsqueeze(0), margin, kind=energy)[0].view(*grid)


def _group_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` ``[rows, cols]`` -> (dense group id per patch ``[rows, cols]``, group sizes)."""
    _, dense, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return dense.reshape(labels.shape), sizes


def _palette(group_ids: np.ndarray) -> np.ndarray:
    """A distinct-looking colour per group id (golden-ratio hue steps), ``[..., 3]`` in [0, 1]."""
    hue = (group_ids * 0.6180339887498949) % 1.0
    saturation, value = 0.65, 0.95
    # HSV -> RGB for the fixed saturation and value.
    k = (np.stack([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
    return value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def render_merge_map(image: np.ndarray, labels: torch.Tensor | np.ndarray, colour: str = "mean") -> np.ndarray:
    """Paint the merge groups of a patch grid over an image.

    Args:
        image: ``[H, W, 3]`` floats in [0, 1]; ``H`` and ``W`` multiples of the grid.
        labels: ``[rows, cols]`` token holding each patch (any integer labels; a negative
            label marks a patch no token holds, e.g. dropped by a selection method).
        colour: ``"mean"`` (each group filled with the mean colour of its patches) or
            ``"palette"`` (a hashed colour per group, blended with the image).

    Returns:
        ``[H, W, 3]`` floats in [0, 1]: filled groups, black boundaries between patches
        of different groups, a yellow outline around single-patch tokens, dropped patches
        dark grey (a quarter of the image showing through).
    """
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour must be one of {COLOUR_MODES}, got {colour!r}")
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    rows, cols = labels.shape
    height, width = image.shape[:2]
    if height % rows or width % cols:
        raise ValueError(f"image {height}x{width} is not a multiple of the {rows}x{cols} patch grid")
    cell_h, cell_w = height // rows, width // cols
    group, sizes = _group_ids(labels)

    if colour == "mean":
        patch_rgb = image.reshape(rows, cell_h, cols, cell_w, 3).mean(axis=(1, 3))  # [rows, cols, 3]
        group_sum = np.zeros((len(sizes), 3))
        np.add.at(group_sum, group.ravel(), patch_rgb.reshape(-1, 3))
        fill = (group_sum / sizes[:, None])[group]
        canvas = np.repeat(np.repeat(fill, cell_h, axis=0), cell_w, axis=1)
    else:
        tint = np.repeat(np.repeat(_palette(group), cell_h, axis=0), cell_w, axis=1)
        canvas = 0.6 * tint + 0.4 * image

    pixel_group = np.repeat(np.repeat(group, cell_h, axis=0), cell_w, axis=1)
    boundary = np.zeros((height, width), dtype=bool)
    # Mark both pixels either side of a change of group: a 2-pixel line on the patch edge.
    horizontal = pixel_group[:, 1:] != pixel_group[:, :-1]
    vertical = pixel_group[1:, :] != pixel_group[:-1, :]
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    boundary[1:, :] |= vertical
    boundary[:-1, :] |= vertical
    canvas[boundary] = BOUNDARY_RGB

    single = np.repeat(np.repeat(sizes[group] == 1, cell_h, axis=0), cell_w, axis=1)
    # Thin enough that a grid of mostly unmerged patches does not turn into a yellow wash.
    thickness = max(1, min(cell_h, cell_w) // 12)
    row_in_cell = np.arange(height)[:, None] % cell_h
    col_in_cell = np.arange(width)[None, :] % cell_w
    on_cell_edge = (
        (row_in_cell < thickness)
        | (row_in_cell >= cell_h - thickness)
        | (col_in_cell < thickness)
        | (col_in_cell >= cell_w - thickness)
    )
    dropped = np.repeat(np.repeat(labels < 0, cell_h, axis=0), cell_w, axis=1)
    canvas[single & on_cell_edge & ~dropped] = SINGLETON_RGB
    canvas[dropped] = 0.75 * np.asarray(DROPPED_RGB) + 0.25 * image[dropped]
    return np.clip(canvas, 0.0, 1.0)


# ------------------------------------------------------------------- figure
@dataclass
class MergeMapRow:
    """One method's row of a merge-map figure.

    Attributes:
        label: row label (method, keep ratio, tokens reaching the LLM).
        maps: ``[rows, cols]`` merge map per column.
        titles: title per column (e.g. ``"layer 6: 342 tokens"``).
    """

    label: str
    maps: list[torch.Tensor]
    titles: list[str]


@dataclass(frozen=True)
class FigureLayout:
    """Exact pixel geometry of a merge-map figure (matplotlib at ``dpi``, no tight bbox)."""

    num_rows: int
    num_cols: int
    panel_h: int
    panel_w: int
    has_colorbars: bool = False
    left_px: int = 150
    right_px: int = 12
    top_px: int = 64
    title_px: int = 26
    gap_px: int = 10
    colorbar_px: int = 30
    bottom_px: int = 10
    dpi: int = 100

    @property
    def width_px(self) -> int:
        return self.left_px + self.num_cols * self.panel_w + (self.num_cols - 1) * self.gap_px + self.right_px

    def row_height(self, row: int) -> int:
        last = row == self.num_rows - 1
        return self.title_px + self.panel_h + (self.colorbar_px if (last and self.has_colorbars) else 0)

    @property
    def height_px(self) -> int:
        rows = sum(self.row_height(r) for r in range(self.num_rows))
        return self.top_px + rows + (self.num_rows - 1) * self.gap_px + self.bottom_px

    def panel_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of a panel in pixels from the top-left corner."""
        x = self.left_px + col * (self.panel_w + self.gap_px)
        y = self.top_px + sum(self.row_height(r) + self.gap_px for r in range(row)) + self.title_px
        return x, y, self.panel_w, self.panel_h

    def to_figure(self, x: float, y: float, w: float, h: float) -> list[float]:
        """Pixel box (top-left origin) -> matplotlib figure fractions (bottom-left origin)."""
        width, height = self.width_px, self.height_px
        return [x / width, 1.0 - (y + h) / height, w / width, h / height]


def figure_size_px(
    num_methods: int,
    num_layers: int,
    grid: tuple[int, int],
    panel_px: int = 240,
    energy: bool = True,
    input_column: bool = True,
) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG `plot_merge_maps` writes for these arguments."""
    layout = _layout(num_methods, num_layers, grid, panel_px, energy, input_column)
    return layout.width_px, layout.height_px


def _layout(
    num_methods: int, num_layers: int, grid: tuple[int, int], panel_px: int, energy: bool, input_column: bool
) -> FigureLayout:
    # Whole pixels per patch, so patch edges land on pixel edges and nothing is resampled.
    cell = max(1, panel_px // max(grid))
    return FigureLayout(
        num_rows=num_methods + (1 if energy else 0),
        num_cols=num_layers + (1 if input_column else 0),
        panel_h=grid[0] * cell,
        panel_w=grid[1] * cell,
        has_colorbars=energy,
    )


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0


def plot_merge_maps(
    image: np.ndarray,
    rows: Sequence[MergeMapRow],
    path: str | Path,
    *,
    energy: Sequence[torch.Tensor] | None = None,
    energy_titles: Sequence[str] | None = None,
    energy_label: str = "PiToMe energy",
    title: str = "",
    caption: str = "",
    colour: str = "mean",
    panel_px: int = 240,
    input_column: bool = True,
) -> Path:
    """Save a merge-map figure as PNG: rows = methods (+ an energy row), columns = layers.

    Args:
        image: ``[H, W, 3]`` floats in [0, 1], the image as the model sees it.
        rows: one `MergeMapRow` per method, all with the same number of maps.
        path: PNG file to write (folders are created).
        energy: optional ``[rows, cols]`` energy map per column.
        energy_titles: titles of the energy panels.
        energy_label: label of the energy row.
        title, caption: figure title and a second line under it (e.g. `RANDOM_WEIGHTS_NOTE`).
        colour: ``"mean"`` or ``"palette"`` (see `render_merge_map`).
        panel_px: target panel size; rounded down to whole pixels per patch.
        input_column: add a first column with the input image and a legend.

    Returns:
        ``path``; its pixel size is `figure_size_px` of the same arguments.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("need at least one row of merge maps")
    num_cols = len(rows[0].maps)
    if any(len(row.maps) != num_cols or len(row.titles) != num_cols for row in rows):
        raise ValueError("every row needs one map and one title per column")
    if energy is not None and len(energy) != num_cols:
        raise ValueError(f"need one energy map per column ({num_cols}), got {len(energy)}")
    grid = tuple(rows[0].maps[0].shape)
    layout = _layout(len(rows), num_cols, grid, panel_px, energy is not None, input_column)
    panel_image = _resize(image, layout.panel_h, layout.panel_w)
    col_offset = 1 if input_column else 0

    fig = plt.figure(figsize=(layout.width_px / layout.dpi, layout.height_px / layout.dpi), dpi=layout.dpi)
    try:
        if title:
            fig.text(0.5, 1.0 - 20 / layout.height_px, title, ha="center", va="center", fontsize=12, weight="bold")
        if caption:
            fig.text(0.5, 1.0 - 44 / layout.height_px, caption, ha="center", va="center", fontsize=9, style="italic")

        def panel(row: int, col: int, panel_title: str = ""):
            ax = fig.add_axes(layout.to_figure(*layout.panel_box(row, col)))
            ax.set_axis_off()
            if panel_title:
                ax.set_title(panel_title, fontsize=9, pad=4)
            return ax

        def row_label(row: int, text: str) -> None:
            x, y, _, h = layout.panel_box(row, 0)
            fig.text(8 / layout.width_px, 1.0 - (y + h / 2) / layout.height_px, text, va="center", fontsize=9)

        for row_idx, row in enumerate(rows):
            row_label(row_idx, row.label)
            for col_idx, (labels, panel_title) in enumerate(zip(row.maps, row.titles, strict=True)):
                ax = panel(row_idx, col_idx + col_offset, panel_title)
                ax.imshow(render_merge_map(panel_image, labels, colour), interpolation="nearest")

        if energy is not None:
            energy_row = len(rows)
            row_label(energy_row, energy_label)
            titles = energy_titles or [""] * num_cols
            for col_idx, (values, panel_title) in enumerate(zip(energy, titles, strict=True)):
                ax = panel(energy_row, col_idx + col_offset, panel_title)
                shown = ax.imshow(values.cpu().numpy(), cmap="magma", interpolation="nearest")
                x, y, w, h = layout.panel_box(energy_row, col_idx + col_offset)
                bar = fig.add_axes(layout.to_figure(x + 10, y + h + 8, w - 20, 9))
                fig.colorbar(shown, cax=bar, orientation="horizontal")
                bar.tick_params(labelsize=7, length=2, pad=1)

        if input_column:
            ax = panel(0, 0, "input (as the model sees it)")
            ax.imshow(panel_image, interpolation="nearest")
            legend = (
                "each colour: one token\n(mean colour of its patches)\n\nblack lines: group edges\n\n"
                "yellow outline: token that\nstill holds a single patch"
            )
            if layout.num_rows > 1:
                ax = panel(1, 0)
                ax.text(0.02, 0.5, legend, fontsize=8, va="center", ha="left", transform=ax.transAxes)
            if energy is not None and layout.num_rows > 2:
                ax = panel(layout.num_rows - 1, 0)
                ax.text(
                    0.02,
                    0.5,
                    "energy of each patch over\nall patches of the unmerged\ntower (ELU(cos - m)).\n"
                    "High: near-duplicate,\nmerged first; low: protected",
                    fontsize=8,
                    va="center",
                    ha="left",
                    transform=ax.transAxes,
                )

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=layout.dpi)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------- line plots
@dataclass
class Curve:
    """One line of a `plot_curves` panel: ``mean`` over ``x`` with an optional ``low``-``high`` band."""

    label: str
    x: list[float]
    mean: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


@dataclass
class CurvePanel:
    """One axes of a `plot_curves` figure."""

    title: str
    curves: list[Curve]
    xlabel: str = ""
    ylabel: str = ""
    invert_x: bool = False  # e.g. "tokens left": merging progresses to the right


CURVE_PANEL_PX = (520, 400)
CURVE_HEADER_PX = 60
CURVE_MIN_WIDTH_PX = 820  # room for a title and caption over a single panel


def curves_size_px(num_panels: int, panel_px: tuple[int, int] = CURVE_PANEL_PX) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG `plot_curves` writes for ``num_panels`` panels."""
    return max(panel_px[0] * num_panels, CURVE_MIN_WIDTH_PX), panel_px[1] + CURVE_HEADER_PX


def plot_curves(
    panels: Sequence[CurvePanel],
    path: str | Path,
    *,
    title: str = "",
    caption: str = "",
    panel_px: tuple[int, int] = CURVE_PANEL_PX,
) -> Path:
    """Save side-by-side line plots (e.g. spectral distance vs layer) as a PNG of `curves_size_px`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not panels:
        raise ValueError("need at least one panel")
    dpi = 100
    width, height = curves_size_px(len(panels), panel_px)
    fig, axes = plt.subplots(1, len(panels), figsize=(width / dpi, height / dpi), dpi=dpi, squeeze=False)
    try:
        fig.subplots_adjust(
            left=70 / width,
            right=1 - 20 / width,
            top=1 - (CURVE_HEADER_PX + 30) / height,
            bottom=55 / height,
            wspace=0.28,
        )
        if title:
            fig.text(0.5, 1 - 18 / height, title, ha="center", va="center", fontsize=12, weight="bold")
        if caption:
            fig.text(0.5, 1 - 40 / height, caption, ha="center", va="center", fontsize=9, style="italic")
        for ax, panel in zip(axes[0], panels, strict=True):
            for curve in panel.curves:
                (line,) = ax.plot(curve.x, curve.mean, marker="o", markersize=3, label=curve.label)
                if curve.low is not None and curve.high is not None:
                    ax.fill_between(curve.x, curve.low, curve.high, color=line.get_color(), alpha=0.18, linewidth=0)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel(panel.xlabel, fontsize=9)
            ax.set_ylabel(panel.ylabel, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if panel.invert_x:
                ax.invert_xaxis()
            if all(float(x).is_integer() for curve in panel.curves for x in curve.x):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------- model-backed runs
def pixel_values_for(processor, image) -> torch.Tensor:
    """``[1, 3, H, W]`` pixel values of a PIL image, preprocessed as the model expects."""
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor(images=image, return_tensors="pt")["pixel_values"]


def displayable(pixel_values: torch.Tensor, processor=None) -> np.ndarray:
    """Undo the processor's normalisation: ``[1, 3, H, W]`` -> ``[H, W, 3]`` floats in [0, 1]."""
    image_processor = getattr(processor, "image_processor", processor)
    pixels = pixel_values[0].detach().float().cpu()
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is not None and std is not None:
        pixels = pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    else:  # unknown normalisation: stretch to [0, 1]
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-12)
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64)


def _model_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def vision_hidden_states(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the vision tower (index 0: embeddings; ``l + 1``: output of layer ``l``).

    Read the way the model's own image encoding computes them (its adapter's
    `pitome_mllm.models.ModelParts.vision_hidden_states`). On a patched model the entries after
    the first merge are shorter.
    """
    from ..models import model_parts

    read_hidden_states = model_parts(model).vision_hidden_states
    device, dtype = _model_placement(model)
    with torch.no_grad():
        hidden_states = read_hidden_states(pixel_values.to(device=device, dtype=dtype))
    return tuple(h.detach() for h in hidden_states)


@dataclass
class MergeRecord:
    """The merges one patched vision-tower forward made.

    Attributes:
        method, keep_ratio: of the patch (``keep_ratio`` as the tower used it).
        num_visual_tokens: tokens per image the language model receives.
        num_tokens: tokens entering the tower (class token at index 0 included).
        last_layer: last vision layer the model reads.
        merges: ``(layer_idx, Merge)`` of every step, in order.
        final_token_map: ``[B, num_patches]`` LLM token holding each patch (after the
            projector stage; class token dropped).
    """

    method: str
    keep_ratio: float
    num_visual_tokens: int
    num_tokens: int
    last_layer: int
    merges: list[tuple[int, Merge]]
    final_token_map: torch.Tensor | None
    layer_methods: list[str] = field(default_factory=list)

    def schedule_summary(self) -> str:
        """Which step each layer ran, as runs: ``"tome 0-12, pitome 13-22"``."""
        runs: list[list] = []
        for layer_idx, method in enumerate(self.layer_methods):
            if runs and runs[-1][0] == method:
                runs[-1][2] = layer_idx
            else:
                runs.append([method, layer_idx, layer_idx])
        return ", ".join(f"{m} {a}" if a == b else f"{m} {a}-{b}" for m, a, b in runs)

    @property
    def batch_size(self) -> int:
        return self.merges[0][1].batch_size if self.merges else 1

    def token_maps(self) -> list[torch.Tensor]:
        """``[B, num_tokens]`` token map after every layer ``0..last_layer`` (class token at 0)."""
        token_map = torch.arange(self.num_tokens).expand(self.batch_size, self.num_tokens).clone()
        by_layer = dict(self.merges)
        maps = []
        for layer_idx in range(self.last_layer + 1):
            step = by_layer.get(layer_idx)
            if step is not None:
                token_map = step.to("cpu").track_source(token_map)
            maps.append(token_map)
        return maps

    def token_map_after(self, layer_idx: int) -> torch.Tensor:
        """``[B, num_tokens]`` the token holding each original token after layer ``layer_idx``."""
        self.check_layer(layer_idx)
        return self.token_maps()[layer_idx]

    def patch_labels_after(self, layer_idx: int) -> torch.Tensor:
        """``[B, num_tokens - 1]``: as `token_map_after`, class token left out."""
        return self.token_map_after(layer_idx)[:, 1:]

    def tokens_after(self, layer_idx: int) -> int:
        """Tokens after layer ``layer_idx`` (class token included)."""
        self.check_layer(layer_idx)
        return self.num_tokens - sum(step.num_removed for idx, step in self.merges if idx <= layer_idx)

    def check_layer(self, layer_idx: int) -> None:
        if not (0 <= layer_idx <= self.last_layer):
            raise ValueError(f"layer {layer_idx} is out of range: the model reads vision layers 0..{self.last_layer}")


@contextlib.contextmanager
def patched_tower(model: torch.nn.Module, **config) -> Iterator:
    """`pitome_mllm.patched` without the processor, for runs of the vision tower on pixel values.

    No prompt is built, so the processor's placeholder count does not matter here, and patch()'s
    warning about patching without the processor (meant for generation) would only be noise.
    """
    from ..api import patched

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"patched \S+ without its processor", category=UserWarning)
        with patched(model, None, **config) as handle:
            yield handle


def last_vision_layer(model: torch.nn.Module) -> int:
    """Index of the last vision layer the model reads (from the patch plan; nothing runs)."""
    with patched_tower(model, method="none") as handle:
        return handle.schedule[-1].layer_idx


def trace_merges(model: torch.nn.Module, pixel_values: torch.Tensor, **config) -> MergeRecord:
    """Patch ``model`` with ``config`` (keyword arguments of `pitome_mllm.patch`), run the
    vision tower once with merge recording, unpatch, and return what was merged."""
    with patched_tower(model, **config) as handle:
        handle.record_merges(True)
        hidden_states = vision_hidden_states(model, pixel_values)
        trace = handle.trace
        schedule = handle.schedule
        final = handle.final_token_map
        return MergeRecord(
            method=handle.config.method,
            keep_ratio=handle.keep_ratio,
            num_visual_tokens=handle.num_visual_tokens,
            num_tokens=hidden_states[0].shape[1],
            last_layer=schedule[-1].layer_idx,
            merges=[(idx, step.to("cpu")) for idx, step in trace.merges],
            final_token_map=None if final is None else final.detach().cpu(),
            layer_methods=[step.method for step in schedule],
        )


@dataclass
class VisualizeResult:
    """What `visualize` drew: the PNG path and the token counts of every panel."""

    path: Path
    layers: list[int]
    keep_ratio: dict[str, float]
    tokens_after_layer: dict[str, list[int]]
    num_visual_tokens: dict[str, int]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "layers": self.layers,
            "keep_ratio": self.keep_ratio,
            "tokens_after_layer": self.tokens_after_layer,
            "num_visual_tokens": self.num_visual_tokens,
        }


def visualize(
    model: torch.nn.Module,
    processor,
    image,
    path: str | Path,
    *,
    methods: Sequence[str] = ("tome", "pitome"),
    keep_ratio: float = 0.9,
    layers: Sequence[int] = (0, 6, 12, 22),
    preset: str = "reference",
    colour: str = "mean",
    energy: bool = True,
    title: str = "",
    caption: str = "",
    panel_px: int = 240,
) -> VisualizeResult:
    """Merge maps of ``image`` through an (unpatched) model for each method, saved as PNG.

    The model is patched once per method and unpatched again; the energy row is
    computed on the unmerged tower's output of each chosen layer (hidden-state metric,
    the layer's margin ``0.9 - 0.9 l / L``), i.e. what PiToMe would score at that layer
    had nothing been merged before.
    """
    pixel_values = pixel_values_for(processor, image)
    height, width = pixel_values.shape[-2:]
    unmerged = vision_hidden_states(model, pixel_values)
    num_layers = len(unmerged) - 1
    grid = patch_grid(unmerged[0].shape[1] - 1, height, width)

    rows, keep_ratios, counts, visual_tokens = [], {}, {}, {}
    for method in methods:
        record = trace_merges(model, pixel_values, method=method, keep_ratio=keep_ratio, preset=preset)
        for layer_idx in layers:
            record.check_layer(layer_idx)
        layer_counts = [record.tokens_after(layer_idx) - 1 for layer_idx in layers]
        rows.append(record_row(record, layers, grid))
        keep_ratios[method] = record.keep_ratio
        counts[method] = layer_counts
        visual_tokens[method] = record.num_visual_tokens

    energies = energy_titles = None
    if energy:
        margins = [margin_for_layer(layer_idx, num_layers) for layer_idx in layers]
        energies = [
            energy_map(unmerged[layer_idx + 1][0, 1:], margin, grid)
            for layer_idx, margin in zip(layers, margins, strict=True)
        ]
        energy_titles = [
            f"layer {layer_idx}, m = {margin:.3f}" for layer_idx, margin in zip(layers, margins, strict=True)
        ]

    path = plot_merge_maps(
        displayable(pixel_values, processor),
        rows,
        path,
        energy=energies,
        energy_titles=energy_titles,
        energy_label="energy\n(unmerged tower)",
        title=title,
        caption=caption,
        colour=colour,
        panel_px=panel_px,
    )
    return VisualizeResult(Path(path), list(layers), keep_ratios, counts, visual_tokens)


def record_row(record: MergeRecord, layers: Sequence[int], grid: tuple[int, int]) -> MergeMapRow:
    """The figure row of one traced method: maps of the patch tokens; the titles count visual tokens,
    class token excluded, as ``pitome-mllm schedule``, ``demo`` and ``visualize``'s table do."""
    maps = [record.patch_labels_after(layer_idx)[0].view(*grid) for layer_idx in layers]
    titles = [f"after layer {layer_idx}: {record.tokens_after(layer_idx) - 1} tokens" for layer_idx in layers]
    label = (
        f"{record.method}\nkeep ratio {record.keep_ratio:.4g}\n{record.num_visual_tokens} tokens to LLM\n\n"
        + record.schedule_summary().replace(", ", "\n")
    )
    return MergeMapRow(label, maps, titles)


# ------------------------------------------------------- merged-grid towers (Qwen-VL)
@dataclass
class MergedGridResult:
    """What `visualize_merged_grid` drew: the PNG and, per method, the merge map of the image.

    Attributes:
        grid: ``(rows, cols)`` merged-grid cells of the image (one native language-model token each).
        native_tokens: tokens the unpatched model gives the image (``rows * cols``).
        kept_tokens: per method, the tokens the patched model gives it.
        merge_maps: per method, ``[rows, cols]`` the kept token holding each cell (``-1``: dropped).
        settings: per method, the `pitome_mllm.patch` keywords used.
    """

    path: Path
    grid: tuple[int, int]
    native_tokens: int
    kept_tokens: dict[str, int]
    merge_maps: dict[str, torch.Tensor]
    settings: dict[str, dict]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "grid": list(self.grid),
            "native_tokens": self.native_tokens,
            "kept_tokens": self.kept_tokens,
            "settings": self.settings,
            "merge_maps": {method: labels.tolist() for method, labels in self.merge_maps.items()},
        }


def encode_image_cells(model: torch.nn.Module, processor, image, **config):
    """Patch ``model`` with ``config``, encode ``image`` once, unpatch; the image's
    `pitome_mllm.models.qwen_tools.ImageCells` (its merge map on the merged grid)."""
    from ..api import patched
    from ..models import model_parts
    from ..models.qwen_tools import image_encoding_kwargs, last_image_cells

    device, dtype = _model_placement(model)
    with patched(model, processor, **config) as handle:
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device=device, dtype=dtype)
        extra = {name: value.to(device) for name, value in image_encoding_kwargs(model, inputs).items()}
        with torch.no_grad():
            model_parts(model).encode_images(pixel_values, **extra)
        return last_image_cells(handle)[0]


def visualize_merged_grid(
    model: torch.nn.Module,
    processor,
    image,
    path: str | Path,
    *,
    methods: Sequence[str] = ("tome", "pitome"),
    budget: dict | None = None,
    colour: str = "mean",
    title: str = "",
    caption: str = "",
    panel_px: int = 240,
) -> MergedGridResult:
    """Merge maps of ``image`` on a tower that reduces its merged grid (Qwen-VL), one row per method.

    Each panel paints the cells (one native language-model token each: a ``merge_size``-square block of
    patches) that share a kept token, on the image resized as the processor resizes it; the plan is the one
    the patched model's image encoding makes (``budget``: ``keep_ratio`` and / or ``target_tokens``).
    """
    from PIL import Image

    from ..models.qwen_tools import cell_pixels

    budget = dict(budget or {"keep_ratio": 0.9})
    side = cell_pixels(model)
    rows, kept, maps, settings, native, grid = [], {}, {}, {}, 0, (0, 0)
    for method in methods:
        config = {"method": method, **budget}
        cells = encode_image_cells(model, processor, image, **config)
        frames, height, width = cells.grid
        grid, native = (height, width), frames * height * width
        labels = cells.cell_tokens[0]
        maps[method], kept[method], settings[method] = labels, cells.kept_tokens, config
        rows.append(MergeMapRow(f"{method}\n{cells.kept_tokens} of {native}\ntokens to LLM", [labels], [""]))
    resized = image.convert("RGB").resize((grid[1] * side, grid[0] * side), Image.BICUBIC)
    shown = np.asarray(resized, dtype=np.float64) / 255.0
    for row in rows:
        row.titles = [f"{grid[0]}x{grid[1]} cells of {side} px"]
    path = plot_merge_maps(shown, rows, path, title=title, caption=caption, colour=colour, panel_px=panel_px)
    return MergedGridResult(Path(path), grid, native, kept, maps, settings)


__all__ = [
    "COLOUR_MODES",
    "Curve",
    "CurvePanel",
    "RANDOM_WEIGHTS_NOTE",
    "FigureLayout",
    "MergeMapRow",
    "MergeRecord",
    "MergedGridResult",
    "VisualizeResult",
    "displayable",
    "encode_image_cells",
    "energy_map",
    "curves_size_px",
    "figure_size_px",
    "last_vision_layer",
    "merge_maps_from_tokens",
    "patch_grid",
    "patched_tower",
    "record_row",
    "pixel_values_for",
    "plot_curves",
    "plot_merge_maps",
    "render_merge_map",
    "trace_merges",
    "vision_hidden_states",
    "visualize",
    "visualize_merged_grid",
]

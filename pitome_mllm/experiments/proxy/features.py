"""The visual tokens one setting gives the language model, summarised per image.

`run_setting` patches the model with a setting, runs the images through it and keeps what the
scores need: plain and size-weighted pools, per-patch cosine against the unmerged features and
the final token maps. The unmerged features are computed once and cached (`feature_cache_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .images import to_pixel_values


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


def feature_cache_path(dataset: str, split: str, count: int, image_size: int, what: str) -> Path:
    from ...common.files import cache_dir

    return cache_dir() / "proxy" / f"{dataset}_{split}{count}_{image_size}px_{what}.pt"

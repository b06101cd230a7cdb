"""The fidelity proxy's images: Fashion-MNIST or sklearn's digits, as the tower's pixel values.

Grey images in [0, 1], upscaled to the tower's size as RGB with ImageNet normalisation.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DATASETS = ("fashion-mnist", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = "apt-get install dataset-fashion-mnist"
DIGITS_IMAGES = 1797  # sklearn load_digits


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

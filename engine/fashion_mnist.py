"""Reader for Debian's `dataset-fashion-mnist` (real 28x28 clothing images, 10 classes)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .prompts import class_prompt

DEFAULT_DIR = Path(os.environ.get("OTCLIP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

# Class names with synonyms: the prompts list all of them, which pins the sense down for a text model.
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt (top, tee)",
    "trouser (pants, jeans)",
    "pullover (sweater, jumper)",
    "dress (gown, frock)",
    "coat (jacket, overcoat)",
    "sandal (open-toed summer shoe)",
    "shirt (button-down shirt, blouse)",
    "sneaker (trainer, running shoe)",
    "bag (handbag, purse)",
    "ankle boot (boot, bootie)",
)
SHORT_NAMES: tuple[str, ...] = tuple(name.split(" (")[0] for name in CLASS_NAMES)


def available(directory: Path = DEFAULT_DIR) -> bool:
    return (directory / "t10k-images-idx3-ubyte.gz").exists()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str = "test", directory: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and (n,) int64 labels of the 'train' (60k) or 'test' (10k) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = directory / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images}: Fashion-MNIST not found; install Debian's dataset-fashion-mnist")
    labels = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return _read_idx(images), labels


def to_photo(array: np.ndarray) -> Image.Image:
    """A Fashion-MNIST item as an RGB photo: inverted to a dark item on white, as products are shot."""
    return ImageOps.invert(Image.fromarray(array, mode="L")).convert("RGB")


def class_prompts(template: str = "a photo of {}.") -> list[str]:
    return [class_prompt(name, template) for name in CLASS_NAMES]

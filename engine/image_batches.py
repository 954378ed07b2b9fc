"""What image encoding yields batch by batch, and the per-image decode it starts from: shared by the torch
Encoder (decoding in DataLoader workers) and the ONNX image tower (decoding in threads), so both index an
image alike: the same decode, display copy, EXIF time and failure reasons. Nothing here imports torch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageDecodeError, ImageInput, load_image, photo_size, taken_time, thumbnail_jpeg


@dataclass
class ImageBatch:
    """One encoded batch: `embeddings[j]` belongs to input `indices[j]` of decoded size `sizes[j]`
    (width, height); `failures` are (index, reason)."""

    indices: list[int]
    embeddings: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    thumbnails: list[bytes] = field(default_factory=list)  # JPEG display copies, when asked for
    taken: list[float | None] = field(default_factory=list)  # EXIF DateTimeOriginal (images.taken_time)


@dataclass
class DecodedImage:
    """One input ready for the model: its network input, decoded size, display copy and EXIF time."""

    pixels: Any  # what `preprocess` returned
    size: tuple[int, int]
    thumbnail: bytes
    taken: float | None


def decode_for_model(item: ImageInput, preprocess: Callable, draft: int | None,
                     thumbnails: bool) -> DecodedImage | str:
    """Decode and preprocess one input, or say why it cannot be (never raises: one bad file must not stop
    a batch, a worker or the run). The display copy comes from the same decode (a draft-decoded JPEG is
    still at least the model's side)."""
    try:
        image = load_image(item, draft=draft)
        return DecodedImage(preprocess(image), photo_size(image), thumbnail_jpeg(image) if thumbnails else b"",
                            taken_time(image))
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:
        return f"cannot preprocess ({type(exc).__name__}: {exc})"


def unfilled_batch(decoded: list[tuple[int, DecodedImage | str]], dim: int,
                   thumbnails: bool) -> tuple[list[Any], ImageBatch]:
    """The model inputs of the decoded (index, image) pairs, in order, and their batch: indices, failures,
    sizes, display copies (when asked for) and EXIF times, with no embeddings (0 x dim) until the forward
    pass fills them in."""
    ok = [(i, d) for i, d in decoded if not isinstance(d, str)]
    batch = ImageBatch([i for i, _ in ok], np.zeros((0, dim), np.float32),
                       [(i, d) for i, d in decoded if isinstance(d, str)], [d.size for _, d in ok],
                       [d.thumbnail for _, d in ok] if thumbnails else [], [d.taken for _, d in ok])
    return [d.pixels for _, d in ok], batch


def refuse_failures(batch: ImageBatch, images: Sequence[ImageInput]) -> None:
    """ImageDecodeError naming the batch's first input that could not be decoded, if any."""
    if batch.failures:
        index, reason = batch.failures[0]
        item = images[index]
        raise ImageDecodeError(str(item) if isinstance(item, (str, Path)) else f"image #{index}", reason)


def embeddings_or_error(batches: Iterable[ImageBatch], images: Sequence[ImageInput], dim: int) -> np.ndarray:
    """All batches' (n, d) embeddings in input order; ImageDecodeError naming the first failed input."""
    parts = [np.zeros((0, dim), np.float32)]
    for batch in batches:
        refuse_failures(batch, images)
        parts.append(batch.embeddings)
    return np.concatenate(parts)


@dataclass
class ReadableImages:
    """The embeddings of the inputs that decode (`indices`, in input order) and (index, reason) of those that do
    not: for commands that skip a damaged file and name it, as indexing does."""

    indices: list[int]
    embeddings: np.ndarray
    failures: list[tuple[int, str]]


def readable_embeddings(batches: Iterable[ImageBatch], dim: int) -> ReadableImages:
    """All batches gathered, failures kept aside (`embeddings_or_error` raises on the first instead)."""
    indices, parts, failures = [], [np.zeros((0, dim), np.float32)], []
    for batch in batches:
        indices += batch.indices
        parts.append(batch.embeddings)
        failures += batch.failures
    return ReadableImages(indices, np.concatenate(parts), failures)


def skipped_images(failures: Sequence[tuple[int, str]], images: Sequence[ImageInput]) -> str:
    """One line naming what was skipped: `skipped 2 of 9 images: a.jpg (not an image ...) and 1 more`."""
    (first, reason), more = failures[0], f" and {len(failures) - 1} more" if len(failures) > 1 else ""
    return f"skipped {len(failures)} of {len(images)} images: {images[first]} ({reason}){more}"


def default_num_workers() -> int:
    """Decoding workers: the cores but one, which the model's forward keeps busy."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))

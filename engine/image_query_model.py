"""Image queries without torch: the index's exported image tower run by ONNX Runtime, after the model's
own preprocessing rebuilt with Pillow and numpy (`otclip search --image`, an image term of a query).

The model's torchvision pipeline Resize -> CenterCrop -> ToTensor -> Normalize, applied to a PIL image,
is itself a sequence of Pillow calls and float32 arithmetic; `preprocess` makes the same calls with the
same sizes and rounding (torchvision's `resize` and `center_crop`), so the pixels match exactly and the
vectors within float rounding. `image_query_export` keeps the export only after comparing its vectors
with the torch encoder's on probe images. Nothing here imports torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from .image_batches import DecodedImage, ImageBatch, decode_for_model, default_num_workers, embeddings_or_error, unfilled_batch
from .images import ImageInput
from .onnx_sessions import cpu_session

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                  "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
BATCHES_AHEAD = 1  # batches decoding while one is encoded
# images per forward: ONNX Runtime's peak memory grows with the batch, its speed does not (128 photos, 8 vs 64:
# ViT-B-32 492 vs 965 MB peak, 9.8 vs 10.9 s; the default model 323 vs 1862 MB, 1.6 vs 2.3 s)
FORWARD_BATCH = 8


def resized_size(width: int, height: int, size: list[int]) -> tuple[int, int]:
    """(w, h) after torchvision's Resize(size): one number sets the shorter side to it and the longer to
    int(size * longer / shorter); two are (h, w) exactly."""
    if len(size) == 2:
        return size[1], size[0]
    short, long = sorted((width, height))
    new_short, new_long = size[0], int(size[0] * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's center_crop: zero padding (split as it splits it) where the crop exceeds the image,
    then the box at round((H - h) / 2), round((W - w) / 2)."""
    if width > image.width or height > image.height:
        left = (width - image.width) // 2 if width > image.width else 0
        top = (height - image.height) // 2 if height > image.height else 0
        right = (width - image.width + 1) // 2 if width > image.width else 0
        bottom = (height - image.height + 1) // 2 if height > image.height else 0
        padded = Image.new(image.mode, (image.width + left + right, image.height + top + bottom))
        padded.paste(image, (left, top))
        image = padded
        if image.size == (width, height):
            return image
    top, left = int(round((image.height - height) / 2.0)), int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """(3, h, w) float32 network input from an RGB image, as the model's torchvision pipeline makes it:
    x = (pixels / 255 - mean) / std after the resize and the centre crop described by `spec`."""
    size = resized_size(image.width, image.height, spec["resize"])
    if size != image.size:  # torchvision leaves an image already at the size untouched
        image = image.resize(size, INTERPOLATIONS[spec["interpolation"]])
    image = center_crop(image, *spec["crop"])
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


class ImageQueryModel:
    """`encode_images` like the torch Encoder's: (n, d) float32 L2-normalised embeddings; an input that is
    not a usable image raises ImageDecodeError naming it."""

    def __init__(self, onnx_path: str | Path, info: dict, threads: int | None = None, few_queries: bool = False) -> None:
        """`few_queries`: a process that answers one query and exits (see `onnx_sessions.cpu_session`)."""
        self.session = cpu_session(onnx_path, threads, few_queries)
        self.input_name = self.session.get_inputs()[0].name
        self.dim = self.session.get_outputs()[0].shape[-1]
        self.spec = info["preprocess"]

    def iter_image_batches(self, images: Sequence[ImageInput], batch_size: int = 64, num_workers: int | None = None,
                           progress: bool | None = None, thumbnails: bool = False) -> Iterator[ImageBatch]:
        """Decode and encode `images` batch by batch, in input order, as the torch Encoder's method does (an
        index of a model with a cached export is built through this, #14). Decoding runs in `num_workers`
        threads, a batch ahead of the forward pass: Pillow's decoders and resampling and numpy release the GIL,
        so threads overlap as the Encoder's worker processes do, without a process each."""
        from tqdm import tqdm

        images = list(images)
        decode = partial(decode_for_model, preprocess=partial(preprocess, spec=self.spec), draft=self.spec["draft"],
                         thumbnails=thumbnails)
        starts = iter(range(0, len(images), batch_size))
        show = progress if progress is not None else len(images) > 4 * batch_size
        workers = max(1, default_num_workers() if num_workers is None else num_workers)
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(images), desc="encode images", unit="img",
                                                       disable=not show) as bar:
            pending: deque = deque()

            def submit(start: int) -> None:
                pending.append((start, [pool.submit(decode, item) for item in images[start : start + batch_size]]))

            for start in islice(starts, BATCHES_AHEAD + 1):
                submit(start)
            while pending:
                start, futures = pending.popleft()
                decoded = [f.result() for f in futures]
                if (following := next(starts, None)) is not None:
                    submit(following)
                yield self._encode([(start + j, d) for j, d in enumerate(decoded)], thumbnails)
                bar.update(len(decoded))

    def _encode(self, decoded: list[tuple[int, DecodedImage | str]], thumbnails: bool) -> ImageBatch:
        pixels, batch = unfilled_batch(decoded, self.dim, thumbnails)
        if pixels:
            stacked = np.stack(pixels)
            batch.embeddings = np.concatenate([
                self.session.run(None, {self.input_name: stacked[i : i + FORWARD_BATCH]})[0]
                for i in range(0, len(stacked), FORWARD_BATCH)]).astype(np.float32, copy=False)
        return batch

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(n, d) embeddings; ImageDecodeError naming the first input that is not a usable image."""
        images = list(images)
        return embeddings_or_error(self.iter_image_batches(images, num_workers=1, progress=False), images, self.dim)

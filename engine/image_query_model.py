"""Image queries without torch: the index's exported image tower run by ONNX Runtime, after the model's
own preprocessing rebuilt with Pillow and numpy (`otclip search --image`, an image term of a query).

The model's torchvision pipeline Resize -> CenterCrop -> ToTensor -> Normalize, applied to a PIL image,
is itself a sequence of Pillow calls and float32 arithmetic; `preprocess` makes the same calls with the
same sizes and rounding (torchvision's `resize` and `center_crop`), so the pixels match exactly and the
vectors within float rounding. `image_query_export` keeps the export only after comparing its vectors
with the torch encoder's on probe images. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ImageDecodeError, ImageInput, load_image
from .threads import thread_budget

INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                  "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


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
        """`few_queries`: a process that answers one query and exits (see TextQueryModel)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if few_queries:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
        options.intra_op_num_threads = thread_budget(threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.spec = info["preprocess"]

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        images = list(images)
        if not images:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), np.float32)
        batch = []
        for i, item in enumerate(images):
            decoded = load_image(item, name=None if isinstance(item, (str, Path)) else f"image #{i}",
                                 draft=self.spec["draft"])
            try:
                batch.append(preprocess(decoded, self.spec))
            except Exception as exc:  # as the torch encoder reports a preprocessing failure
                raise ImageDecodeError(str(item) if isinstance(item, (str, Path)) else f"image #{i}",
                                       f"cannot preprocess ({type(exc).__name__}: {exc})") from None
        (embeddings,) = self.session.run(None, {self.input_name: np.stack(batch)})
        return np.asarray(embeddings, np.float32)

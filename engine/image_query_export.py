"""Export a model's image tower for torch-free image queries (`image_query_model`), checked before it is kept.

Kept only when the model's preprocessing is a torchvision Resize -> CenterCrop -> [RGB] -> ToTensor ->
Normalize (what open_clip and the default model use), and, on probe images of every shape (landscape,
portrait, square, smaller than the input, JPEG decoded in draft mode, PNG, RGBA, greyscale), (1) the
Pillow/numpy preprocessing gives the torchvision pipeline's input within `PIXEL_TOLERANCE` and (2) ONNX
Runtime's embeddings match the float32 torch tower's within `TOLERANCE`. Otherwise nothing is written and
image queries load the torch model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .image_query_model import INTERPOLATIONS, ImageQueryModel, preprocess
from .images import load_image
from .model_loading import LoadedModel
from .onnx_export import export_tower

TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1e-5
PROBE_SHAPES = [(640, 480, "JPEG", "RGB"), (300, 517, "PNG", "RGB"), (224, 224, "JPEG", "RGB"), (50, 31, "PNG", "RGB"),
                (1999, 333, "JPEG", "RGB"), (257, 256, "PNG", "RGBA"), (400, 700, "JPEG", "L")]


class _NormalisedImage(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)


def preprocess_spec(loaded: LoadedModel) -> dict | str:
    """What `image_query_model.preprocess` needs to redo the model's torchvision pipeline, or why it cannot."""
    from torchvision import transforms as T

    steps = list(getattr(loaded.preprocess, "transforms", [loaded.preprocess]))
    rgb = [s for s in steps if type(s).__name__ == "MaybeConvertMode" and getattr(s, "mode", None) == "RGB"
           or getattr(s, "__name__", "") == "_convert_to_rgb"]  # no-ops: load_image gives RGB already
    steps = [s for s in steps if not any(s is r for r in rgb)]
    kinds = [type(s).__name__ for s in steps]
    if (len(steps) != 4 or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop)
            or kinds[2] not in ("ToTensor", "MaybeToTensor") or not isinstance(steps[3], T.Normalize)):
        return f"preprocessing {kinds} has no torch-free equivalent (expected Resize, CenterCrop, ToTensor, Normalize)"
    resize, crop, _, normalize = steps
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    interpolation = resize.interpolation.value
    if resize.max_size is not None or interpolation not in INTERPOLATIONS or len(size) not in (1, 2):
        return f"resize {resize} has no torch-free equivalent"
    crop_size = list(crop.size) * (2 if len(crop.size) == 1 else 1)
    return {"resize": size, "interpolation": interpolation, "crop": crop_size, "mean": list(normalize.mean),
            "std": list(normalize.std), "draft": loaded.image_size}


def export_image_query_model(loaded: LoadedModel, directory) -> str | None:
    """Write the checked export into `directory` (an IndexDirectory); returns None, or why it was not kept."""
    spec = preprocess_spec(loaded)
    if isinstance(spec, str):
        return spec
    device = loaded.device
    tower = _NormalisedImage(loaded.model).to("cpu").eval()
    try:
        return _export_and_check(loaded, tower, spec, directory)
    finally:
        loaded.model.to(device)


def _probe_images(folder: Path) -> list[Path]:
    """Smooth gradients with noise (JPEG-friendly, every pixel distinct), in PROBE_SHAPES."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height, kind, mode) in enumerate(PROBE_SHAPES):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * x / width, 255 * y / height, 128 + 127 * np.sin((x + y) / 17)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert(mode) if mode != "RGBA" else Image.fromarray(
            np.dstack([pixels, np.full((height, width), 200, np.uint8)]), "RGBA")
        path = folder / f"probe-{i}.{kind.lower().replace('jpeg', 'jpg')}"
        image.save(path, kind, **({"quality": 90} if kind == "JPEG" else {}))
        paths.append(path)
    return paths


def _export_and_check(loaded: LoadedModel, tower: nn.Module, spec: dict, directory) -> str | None:
    with tempfile.TemporaryDirectory(prefix="otclip-image-export-") as tmp:
        onnx_path = Path(tmp) / "image.onnx"
        height, width = spec["crop"]
        failed = export_tower(tower, torch.zeros(1, 3, height, width), onnx_path, "pixels", "embedding")
        if failed:
            return failed
        probes = _probe_images(Path(tmp))
        decoded = [load_image(p, draft=spec["draft"]) for p in probes]
        ours = np.stack([preprocess(image, spec) for image in decoded])
        theirs = torch.stack([loaded.preprocess(image) for image in decoded])
        pixel_error = float(np.abs(ours - theirs.numpy()).max())
        if not pixel_error <= PIXEL_TOLERANCE:
            return f"the torch-free preprocessing differs from the model's by {pixel_error:.2e} (> {PIXEL_TOLERANCE:.0e})"
        with torch.no_grad():
            expected = tower(theirs).numpy()
        info = {"preprocess": spec, "model_checksum": loaded.identity.checksum}
        error = float(np.abs(ImageQueryModel(onnx_path, info, threads=1).encode_images(probes) - expected).max())
        if not error <= TOLERANCE:
            return f"ONNX embeddings differ from torch's by {error:.2e} (> {TOLERANCE:.0e})"
        directory.publish_query_model("image", {"image.onnx.data": onnx_path.with_name("image.onnx.data"),
                                                "image.onnx": onnx_path},
                                      {**info, "max_abs_error": error, "max_pixel_error": pixel_error})
    return None

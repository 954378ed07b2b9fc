"""The sample gallery: real photos that ship with scikit-image and scikit-learn, each with a
hand-written caption. Used by `make demo`, the alignment tests and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SamplePhoto:
    name: str
    caption: str


# Captions describe what a person sees; they were written before any model was run on them.
SAMPLE_PHOTOS: tuple[SamplePhoto, ...] = (
    SamplePhoto("astronaut", "an astronaut in a white space suit"),
    SamplePhoto("chelsea", "a tabby cat"),
    SamplePhoto("coffee", "a cup of coffee on a saucer"),
    SamplePhoto("rocket", "a rocket on the launch pad"),
    SamplePhoto("motorcycle", "a motorcycle parked indoors"),
    SamplePhoto("horse", "the black silhouette of a horse"),
    SamplePhoto("camera", "a photographer with a camera on a tripod"),
    SamplePhoto("hubble_deep_field", "galaxies in deep space"),
    SamplePhoto("immunohistochemistry", "stained tissue under a microscope"),
    SamplePhoto("retina", "the retina of a human eye"),
    SamplePhoto("page", "a page of printed text"),
    SamplePhoto("coins", "a collection of old coins"),
    SamplePhoto("brick", "a brick wall"),
    SamplePhoto("grass", "a patch of green grass"),
    SamplePhoto("gravel", "a pile of gravel stones"),
    SamplePhoto("moon", "the cratered surface of the moon"),
    SamplePhoto("colorwheel", "a colour wheel"),
    SamplePhoto("checkerboard", "a black and white checkerboard"),
    SamplePhoto("china", "an old chinese temple among trees"),
    SamplePhoto("flower", "a close-up of a flower"),
)


def _sample_array(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = np.where(arr, 255, 0).astype(np.uint8)
    return arr


def sample_photo(name: str) -> Image.Image:
    """One sample photo as an RGB PIL image."""
    return Image.fromarray(_sample_array(name)).convert("RGB")


def write_sample_photos(folder: str | Path) -> list[Path]:
    """Write every sample photo as `folder/NAME.jpg` (skipping ones already there); return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo in SAMPLE_PHOTOS:
        path = folder / f"{photo.name}.jpg"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            sample_photo(photo.name).save(tmp, format="JPEG", quality=92)
            tmp.replace(path)
        paths.append(path)
    return paths

"""Safe image decoding: every image otclip embeds goes through `load_image`."""

from __future__ import annotations

import datetime
import functools
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .image_paths import is_raw_path, not_a_file

MAX_ASPECT = 50  # longer side / shorter side: beyond it an image is a strip whose resize to the model's
# input (shorter side -> 224) would be gigapixels (a 1 x 30000 PNG of 204 bytes took 7.6 GB)
THUMBNAIL_SIDE = 384  # pixels, the longer side of a result tile (the app's preview enlarges it)
ImageInput = str | Path | bytes | Image.Image  # what every image-taking call accepts
_STORED_SIZE = "otclip_stored_size"  # Image.info key: the JPEG's size before a draft decode shrank it
_TAKEN = "otclip_taken"  # Image.info key: a RAW file's time in Unix seconds, as LibRaw read it (0: none)


class ImageDecodeError(ValueError):
    """An input that is not a usable image; str() names the input and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def check_size(size: tuple[int, int], label: str, max_pixels: int | None) -> None:
    """Refuse, from the header alone, what no resize should be asked to do."""
    w, h = size
    if w == 0 or h == 0:
        raise ImageDecodeError(label, "empty image (zero width or height)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageDecodeError(label, f"{w}x{h} is a strip, not a photo (aspect ratio beyond {MAX_ASPECT}:1)")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(label, f"{w}x{h} is too large (limit {max_pixels:,} pixels)")


@functools.cache
def open_heif() -> None:
    """Teach PIL to open HEIC/HEIF (phones' photos), once, on the first decode: not at import, which the
    torch-free text query path would pay for."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def load_image(source: str | Path | bytes | Image.Image, name: str | None = None, draft: int | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Decode `source` into an RGB image with EXIF orientation applied (first frame if animated).

    `draft`: the smallest side the caller needs; JPEGs are then decoded at a reduced DCT scale
    that still covers it (PIL's draft mode), several times faster for large photos. A camera's RAW file (by its
    path's extension, or for bytes by `name`'s: an upload's file name) is decoded by LibRaw (`_load_raw`).
    `max_pixels`: a tighter pixel limit than PIL's decompression-bomb one (the app's uploads).

    Raises ImageDecodeError for anything that is not a complete, reasonably sized image:
    missing/unreadable files, truncated data, non-images, decompression bombs, and, checked on
    the header before any pixel is decoded, strips beyond MAX_ASPECT:1 and images over `max_pixels`.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, (str, Path)):
        try:
            reason = not_a_file(os.stat(source).st_mode)
        except OSError:
            reason = None  # opening it says why
        if reason:
            raise ImageDecodeError(label, reason)
    if isinstance(source, (str, Path)) and is_raw_path(source):
        return _load_raw(str(source), label, draft, max_pixels)
    if isinstance(source, bytes) and name and is_raw_path(name):  # an upload, known by its file name
        return _load_raw(io.BytesIO(source), label, draft, max_pixels)
    open_heif()
    if isinstance(source, Image.Image):
        img = source
        check_size(img.size, label, max_pixels)
        if draft and img.format == "JPEG" and getattr(img, "tile", None):  # opened, not yet decoded
            img.info[_STORED_SIZE] = img.size
            img.draft("RGB", (draft, draft))
    else:
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        except OSError as exc:
            raise ImageDecodeError(label, f"cannot open ({exc.strerror or exc})") from None
        try:
            with warnings.catch_warnings():
                # PIL's bomb limit is applied to the pixels decoded (below), not to the header: a 100-megapixel
                # medium-format JPEG (11648 x 8736) decodes at an eighth of its side in draft mode. PIL itself still
                # refuses a header beyond twice its limit.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with fp:
                    img = Image.open(fp)
                    check_size(img.size, label, max_pixels)  # the header only: nothing decoded yet
                    if draft and img.format == "JPEG":
                        img.info[_STORED_SIZE] = img.size  # the draft decode is smaller than the photo
                        img.draft("RGB", (draft, draft))
                    if img.width * img.height > (Image.MAX_IMAGE_PIXELS or math.inf):  # what will be decoded
                        raise ImageDecodeError(label, f"too large to decode safely ({img.width}x{img.height} pixels "
                                                      f"to decode, beyond {Image.MAX_IMAGE_PIXELS:,})")
                    img.seek(0)
                    img.load()  # decode now: truncated files fail here, not later in a worker
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(label, f"too large to decode safely ({exc})") from None
        except UnidentifiedImageError:
            raise ImageDecodeError(label, "not an image (cannot identify format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageDecodeError(label, f"corrupt or truncated image ({exc})") from None
    try:
        if _STORED_SIZE in img.info and img.getexif().get(0x0112) in (5, 6, 7, 8):  # turned a quarter
            img.info[_STORED_SIZE] = img.info[_STORED_SIZE][::-1]
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block should not lose the image itself
        pass
    return _to_rgb(img)


_TURNS = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}  # LibRaw flip


def _load_raw(source: str | io.BytesIO, label: str, draft: int | None, max_pixels: int | None) -> Image.Image:
    """A camera's RAW file through LibRaw (rawpy): its embedded JPEG preview (what the camera rendered; LibRaw
    gives it an EXIF header with the orientation) where it covers `draft`, else the mosaic demosaiced at half size
    with the camera's white balance (LibRaw turns it). `photo_size` is the sensor image's, as shown; `taken_time`
    LibRaw's (rawpy >= 0.27), which a demosaiced picture has no EXIF to carry."""
    import rawpy

    try:
        with rawpy.imread(source) as raw:
            width, height, flip = raw.sizes.width, raw.sizes.height, raw.sizes.flip
            size = (height, width) if flip in (5, 6) else (width, height)
            check_size(size, label, max_pixels)
            image = _raw_preview(raw, draft, flip)
            if image is None:
                image = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True))
            taken = raw.other.timestamp
    except (rawpy.LibRawError, OSError, ValueError) as exc:
        raise ImageDecodeError(label, f"RAW file cannot be decoded ({exc})") from None
    image.info[_STORED_SIZE] = size
    image.info[_TAKEN] = taken.timestamp() if taken is not None else None
    return _to_rgb(image)


def _raw_preview(raw, draft: int | None, flip: int) -> Image.Image | None:
    """The RAW file's embedded preview, if it has one at least `draft` pixels on its shorter side."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError:  # none, or one of a kind LibRaw does not give out
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            image = load_image(thumb.data, draft=draft)  # unnamed: a name would make it a RAW file again
        except ImageDecodeError:
            return None
    elif thumb.format == rawpy.ThumbFormat.BITMAP:
        image = Image.fromarray(thumb.data)
        image = image.transpose(_TURNS[flip]) if flip in _TURNS else image
    else:
        return None
    return image if min(image.size) >= (draft or 0) else None


def photo_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the photo as shown (EXIF orientation applied), also when `load_image` decoded a JPEG at a
    reduced scale (draft): what the index records and `--min-width` filters on."""
    return image.info.get(_STORED_SIZE, image.size)


def taken_time(image: Image.Image) -> float | None:
    """When the photo was taken: EXIF DateTimeOriginal (else DateTime) as local time, or a RAW file's time as LibRaw
    read it, in Unix seconds; None when the image has no such tag, a malformed one, or the Unix epoch itself (the
    local time of timestamp 0: LibRaw's time, and what it writes into a RAW file's preview, when the file holds no
    time)."""
    if _TAKEN in image.info:
        return image.info[_TAKEN] or None
    try:
        exif = image.getexif()
        stamp = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)  # ExifIFD DateTimeOriginal, IFD0 DateTime
        if not stamp:
            return None
        seconds = datetime.datetime.strptime(str(stamp).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").timestamp()
        return None if seconds == 0 else seconds
    except (ValueError, TypeError, OSError, AttributeError, KeyError, SyntaxError):
        return None


def thumbnail_jpeg(image: Image.Image, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """JPEG bytes of a display copy of a decoded image (what the index keeps beside each embedding)."""
    copy = image.copy()
    copy.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    copy.save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumbnail(source: str | Path, max_side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A display copy of an indexed image, at most `max_side` pixels on its longer side.

    The app shows these instead of the originals: they are made by the process (so Gradio serves
    them from its cache wherever the photos live) and are a few kB where originals are megabytes.
    JPEGs decode at a reduced DCT scale (draft mode); raises ImageDecodeError like `load_image`.
    """
    img = load_image(source, draft=max_side)
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img

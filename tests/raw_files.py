"""Camera RAW files for the tests, written here since none ship offline: a minimal DNG (Adobe DNG 1.4) that LibRaw
reads as a camera's RAW file, a 16-bit RGGB Bayer mosaic of a given scene, with or without the full-size JPEG
preview cameras embed. Layout: IFD0 holds the preview (NewSubFileType 1) and points at the raw image's IFD through
SubIFDs (tag 330); without a preview the raw image is IFD0 itself."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_FORMAT = {BYTE: "B", ASCII: "B", SHORT: "H", LONG: "I", RATIONAL: "I", SRATIONAL: "i"}
XYZ_TO_SRGB = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])


def _ifd(entries: list[tuple[int, int, list]], blobs: bytearray, blobs_at: int) -> bytes:
    """One IFD (entries sorted by tag); values longer than 4 bytes are appended to `blobs`, which lie at `blobs_at`."""
    out = struct.pack("<H", len(entries))
    for tag, kind, values in sorted(entries):
        count = len(values) // 2 if kind in (RATIONAL, SRATIONAL) else len(values)
        data = struct.pack("<" + _FORMAT[kind] * len(values), *values)
        if len(data) <= 4:
            out += struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0")
        else:
            out += struct.pack("<HHII", tag, kind, count, blobs_at + len(blobs))
            blobs += data + b"\0" * (len(data) % 2)
    return out + struct.pack("<I", 0)


def _ifd_size(entries: list) -> int:
    return 2 + 12 * len(entries) + 4


def write_dng(path: Path, rgb: np.ndarray, preview: bool = True, orientation: int = 1, taken: str | None = None) -> Path:
    """`rgb`: (h, w, 3) linear scene values in [0, 1], h and w even. `preview`: embed a full-size JPEG of the scene
    (gamma 2.2). `orientation`: the EXIF orientation tag. `taken`: "YYYY:MM:DD HH:MM:SS", the DateTime tag."""
    h, w, _ = rgb.shape
    linear = np.clip(rgb * 60000, 0, 65535).astype("<u2")
    mosaic = np.empty((h, w), "<u2")
    mosaic[0::2, 0::2], mosaic[0::2, 1::2] = linear[0::2, 0::2, 0], linear[0::2, 1::2, 1]
    mosaic[1::2, 0::2], mosaic[1::2, 1::2] = linear[1::2, 0::2, 1], linear[1::2, 1::2, 2]
    jpeg = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) ** (1 / 2.2) * 255).round().astype(np.uint8)).save(jpeg, "JPEG", quality=95)
    preview_data = jpeg.getvalue() if preview else b""
    raw_data = mosaic.tobytes()
    matrix = [v for x in XYZ_TO_SRGB.flatten() for v in (int(round(x * 10000)), 10000)]  # ColorMatrix1: camera = sRGB
    camera = [(271, ASCII, list(b"otclip\0")), (272, ASCII, list(b"test\0")), (274, SHORT, [orientation]),
              (50706, BYTE, [1, 4, 0, 0]), (50708, ASCII, list(b"otclip test\0")), (50721, SRATIONAL, matrix),
              (50778, SHORT, [21]), (50728, RATIONAL, [1, 1, 1, 1, 1, 1])]
    if taken:
        camera.append((306, ASCII, list(taken.encode()) + [0]))

    def raw_ifd(offset: int) -> list:
        return [(254, LONG, [0]), (256, LONG, [w]), (257, LONG, [h]), (258, SHORT, [16]), (259, SHORT, [1]),
                (262, SHORT, [32803]), (273, LONG, [offset]), (277, SHORT, [1]), (278, LONG, [h]),
                (279, LONG, [len(raw_data)]), (284, SHORT, [1]), (33421, SHORT, [2, 2]), (33422, BYTE, [0, 1, 1, 2]),
                (50717, LONG, [65535])]

    def preview_ifd(offset: int, raw_ifd_at: int) -> list:
        return [(254, LONG, [1]), (256, LONG, [w]), (257, LONG, [h]), (258, SHORT, [8, 8, 8]), (259, SHORT, [7]),
                (262, SHORT, [2]), (273, LONG, [offset]), (277, SHORT, [3]), (279, LONG, [len(preview_data)]),
                (330, LONG, [raw_ifd_at])]

    ifd0_entries = camera + (preview_ifd(0, 0) if preview else raw_ifd(0))
    raw_ifd_at = 8 + _ifd_size(ifd0_entries)
    blobs_at = raw_ifd_at + (_ifd_size(raw_ifd(0)) if preview else 0)
    data_at = blobs_at + 4096  # the blobs (matrix, strings) fit in 4 kB
    raw_at = data_at + len(preview_data)
    blobs = bytearray()
    if preview:
        ifds = _ifd(camera + preview_ifd(data_at, raw_ifd_at), blobs, blobs_at) + _ifd(raw_ifd(raw_at), blobs, blobs_at)
    else:
        ifds = _ifd(camera + raw_ifd(raw_at), blobs, blobs_at)
    assert len(blobs) <= 4096
    out = (b"II*\0" + struct.pack("<I", 8) + ifds).ljust(blobs_at, b"\0") + bytes(blobs)
    Path(path).write_bytes(out.ljust(data_at, b"\0") + preview_data + raw_data)
    return Path(path)


def write_dng_of(photo: Path, path: Path, preview: bool = False) -> Path:
    """A DNG of what `photo` shows (its pixels taken back to linear light, as a sensor sees the scene), cropped to even
    sides."""
    scene = (np.asarray(Image.open(photo).convert("RGB"), float) / 255) ** 2.2
    h, w = scene.shape[0] // 2 * 2, scene.shape[1] // 2 * 2
    return write_dng(path, scene[:h, :w], preview=preview)

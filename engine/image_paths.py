"""Which paths name images: by extension, without importing an image library (the terminal's fast path
parses queries with it)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".heic", ".heif", ".avif"})  # HEIC/HEIF: pillow-heif; AVIF: Pillow's own (libavif)


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS

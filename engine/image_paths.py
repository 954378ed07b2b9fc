"""Which paths name images: by extension, without importing an image library (the terminal's fast path
parses queries with it)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

# cameras' RAW files, decoded by LibRaw (rawpy): Adobe, Canon, Nikon, Sony, Fujifilm, Olympus/OM, Panasonic, Pentax,
# Samsung, Hasselblad, Phase One, Leica
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw",
                            ".3fr", ".iiq", ".rwl"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".heic", ".heif", ".avif"}) | RAW_EXTENSIONS  # HEIC: pillow-heif; AVIF: Pillow (libavif)


def is_image_path(path: str | Path) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS  # (not Path(): a walk asks for every file)


def is_raw_path(path: str | Path) -> bool:
    return os.path.splitext(path)[1].lower() in RAW_EXTENSIONS


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
DOWNLOAD_FIRST = "otclip reads files on disk: download the images first (e.g. with img2dataset)"
URL_REASON = f"a URL, not a file: {DOWNLOAD_FIRST}"


def is_url(path: str) -> bool:
    """A web address rather than a file (LAION-style manifests list URLs); read as a relative path, it was reported
    as a missing file under the manifest's folder."""
    return bool(_URL.match(path))


def undecodable_name(path: str) -> str | None:
    """Why a path (as `os.walk` gives it: bytes that are not UTF-8 as lone surrogates, PEP 383) cannot be indexed,
    or None. The metadata store, the JSON files and the browser need UTF-8, so such a file is skipped and named
    with `shown_path`: old archives and shares written with a Windows code page (cp1252, cp437) hold such names."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not UTF-8: rename it (`convmv -r -f cp1252 -t utf8 --notest FOLDER` converts a tree)"
    return None


def not_a_file(mode: int) -> str | None:
    """Why a path whose `os.stat` mode is `mode` is not read as an image, or None for a regular file: reading a pipe
    waits for a writer and /dev/zero never ends (an index run hung on either, named *.jpg or linked so)."""
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a device or socket"
    return f"not a file ({kind})"


def shown_path(path: str) -> str:
    """The path with each byte that is not UTF-8 written as \\xNN (for messages and errors.jsonl)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

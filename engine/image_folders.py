"""Listing the image files of a folder tree, as every command that takes a folder of photos lists them (`index`,
`watch`, `rank`): symlinked folders followed once, NAS thumbnails, trash and hidden files left out (`exclusions`),
otclip's own index directories left out, one picture shot as RAW+JPEG counted once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .exclusions import Exclusions
from .image_paths import is_image_path, is_raw_path, shown_path


def is_index_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json")) and os.path.isdir(os.path.join(path, "embeddings"))


def walk_folders(folder: Path, exclusions: Exclusions = Exclusions(),
                 onerror: Callable[[OSError], None] | None = None) -> Iterator[tuple[str, str, list[str]]]:
    """(path, path below `folder` with "/" ("" for itself), the names of its files that `exclusions` keeps) for
    `folder` and each folder below it that `exclusions` keeps, following symlinked folders once (a loop is cut),
    leaving out otclip index directories (`--out PHOTOS/.otclip`: its thumbnails are not photos). `onerror`: as
    `os.walk`'s, for a folder that cannot be listed."""
    seen_dirs: set[tuple[int, int]] = set()

    def kept(below: str, name: str) -> bool:
        return not exclusions.excludes(f"{below}/{name}" if below else name)

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=onerror):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        below = Path(os.path.relpath(dirpath, folder)).as_posix()
        below = "" if below == "." else below  # the folder itself
        dirnames[:] = sorted(d for d in dirnames if kept(below, d) and not is_index_directory(os.path.join(dirpath, d)))
        yield dirpath, below, [name for name in filenames if kept(below, name)]


def image_files(folder: Path, unreadable: list[dict] | None = None, exclusions: Exclusions = Exclusions()) -> list[str]:
    """Image files below `folder`, recursively (`walk_folders`: symlinked folders followed once, less what
    `exclusions` leaves out: NAS thumbnails, trash, hidden files), less a camera's RAW file beside a photo of the same
    name (IMG_1.CR3 and IMG_1.JPG: a camera shooting RAW+JPEG, or an export; as rclip does), which would be the same
    picture twice. A folder that cannot be listed (permission denied, an I/O error) is appended to `unreadable` as
    {"path", "reason"}, not passed over in silence as `os.walk` would."""
    found: list[str] = []

    def failed(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append({"path": shown_path(str(exc.filename)),
                               "reason": f"folder cannot be read ({exc.strerror}): the images in it are left out"})

    for dirpath, _, filenames in walk_folders(folder, exclusions, failed):
        names = [name for name in filenames if is_image_path(name)]
        developed = {os.path.splitext(name)[0] for name in names if not is_raw_path(name)}
        found.extend(os.path.join(dirpath, name) for name in names  # RAW+JPEG: the developed photo stands for both
                     if not (is_raw_path(name) and os.path.splitext(name)[0] in developed))
    return [os.path.abspath(p) for p in sorted(found)]

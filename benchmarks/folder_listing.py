"""What listing a photo library costs `otclip index` and `otclip watch`, on a synthetic Synology-style tree: N photos
(empty files) in folders of 500, and beside each folder an `@eaDir` with a folder of two thumbnails per photo, as
Synology Photos writes them.

Measured (median of --repeat, this machine's disk, warm cache): `walk_images` (each `index` or `watch` run lists the
folder so), the polling listing (`folder_observer._listing` under watchdog's DirectorySnapshot: each poll of a folder
on a network share), the same snapshot without the exclusions (what a poll would cost walking `@eaDir`), and the start
of the system's observer (inotify: watchdog adds a watch per folder, `@eaDir` ones included, which is what meets
`fs.inotify.max_user_watches`). Writes benchmarks/results/folder_listing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.utils.dirsnapshot import DirectorySnapshot

from otclip.engine.exclusions import Exclusions
from otclip.indexer.collection import walk_images
from otclip.indexer.folder_observer import _listing

PER_FOLDER = 500


def build(root: Path, photos: int) -> None:
    """The tree: YEAR/MONTH folders of PER_FOLDER photos, each with its @eaDir."""
    for f in range((photos + PER_FOLDER - 1) // PER_FOLDER):
        folder = root / f"{2000 + f // 12}" / f"{f % 12 + 1:02d}"
        folder.mkdir(parents=True)
        for i in range(min(PER_FOLDER, photos - f * PER_FOLDER)):
            name = f"IMG_{i:04d}.JPG"
            (folder / name).touch()
            thumbs = folder / "@eaDir" / name
            thumbs.mkdir(parents=True)
            for size in ("SM", "XL"):
                (thumbs / f"SYNOPHOTO_THUMB_{size}.jpg").touch()


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        start = time.perf_counter()
        build(root, args.photos)
        made = time.perf_counter() - start
        folders = sum(1 for _ in os.walk(root))  # watchdog's inotify walk: one watch each
        listing = _listing(root, root / ".otclip", Exclusions())
        walk_s, items = timed(lambda: walk_images(root), args.repeat)
        poll_s, polled = timed(lambda: DirectorySnapshot(str(root), listdir=listing), args.repeat)
        plain_s, plain = timed(lambda: DirectorySnapshot(str(root)), args.repeat)

        def observe() -> None:
            observer = Observer()
            observer.schedule(FileSystemEventHandler(), str(root), recursive=True)
            observer.start()
            observer.stop()
            observer.join()

        observe_s, _ = timed(observe, args.repeat)
    watch_limit = Path("/proc/sys/fs/inotify/max_user_watches")
    row = {"photos": args.photos, "build_s": made, "indexed": len(items),
           "walk_images_s": walk_s, "poll_listing_s": poll_s, "poll_paths": len(polled.paths),
           "snapshot_without_exclusions_s": plain_s, "snapshot_paths": len(plain.paths),
           "system_observer_start_s": observe_s, "system_observer_watches": folders,
           "max_user_watches": int(watch_limit.read_text()) if watch_limit.exists() else None}
    print(f"{args.photos:,} photos in folders of {PER_FOLDER}, Synology @eaDir beside them (tree made in {made:.1f} s)")
    print(f"{'what':<52}{'seconds':>9}{'paths':>10}")
    print(f"{'walk_images (each index / watch run)':<52}{walk_s:>9.2f}{len(items):>10,}")
    print(f"{'polling listing, exclusions left out (each poll)':<52}{poll_s:>9.2f}{len(polled.paths):>10,}")
    print(f"{'the same snapshot without the exclusions':<52}{plain_s:>9.2f}{len(plain.paths):>10,}")
    print(f"{'system observer start (inotify, a watch a folder)':<52}{observe_s:>9.2f}{folders:>10,}")
    print(f"fs.inotify.max_user_watches here: {row['max_user_watches']}")
    out = Path(__file__).parent / "results" / "folder_listing.json"
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

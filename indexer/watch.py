"""`otclip watch FOLDER --out DIR`: keep an index current while photos come and go.

The folder is indexed once, then again after each burst of changes (when `settle` seconds pass with no new
event), through the same incremental `index_images`: only new or changed files are embedded, removed ones
are dropped, and each run publishes a new generation that a running `otclip serve` picks up at its next
query. Events come from the `watchdog` package (inotify on Linux, FSEvents, ReadDirectoryChangesW); events
inside the index directory itself (when it lives in the watched folder) are ignored. A folder on a network share
(`filesystems.remote_filesystem`), where another machine's changes raise no event, is listed every `poll` seconds
instead (watchdog's polling observer), past what the exclusions leave out.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from otclip.engine.exclusions import Exclusions
from otclip.engine.image_paths import is_image_path
from otclip.engine.index_directory import IndexDirectory

from .collection import walk_folders
from .filesystems import remote_filesystem
from .pipeline import EmptySourceError, IndexingSummary, index_images

if TYPE_CHECKING:
    from otclip.engine import LoadedModel


REMOTE_POLL_SECONDS = 30.0  # how often a folder on a network share is listed, by default


def watch(folder: str | Path, index_dir: str | Path, model: str | LoadedModel, settle: float = 2.0,
          stop: threading.Event | None = None, report: Callable[[IndexingSummary], None] | None = None,
          poll: float | None = None, **index_options) -> int:
    """Index `folder` into `index_dir` now and after every burst of changes, until `stop` is set (or Ctrl-C).
    `report` gets each run's summary. `poll`: list the folder every `poll` seconds for changes rather than wait for
    the system's events (0: events; None: REMOTE_POLL_SECONDS on a network share, else events). Returns how many
    runs were made."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler

    if poll is not None and not (math.isfinite(poll) and poll >= 0):
        raise ValueError(f"--poll {poll:g}: expected seconds between listings (0: wait for the system's events)")
    folder, index_dir = Path(folder).resolve(), Path(index_dir).resolve()
    exclusions: Exclusions | None = index_options.get("exclusions")
    if exclusions is None:  # those the index keeps from an earlier run given some
        exclusions = IndexDirectory(index_dir).kept_exclusions()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    stop = stop or threading.Event()
    changed = threading.Event()
    links: dict[str, str | None] = {}  # the symlinked folders of the collection (`_linked_folders`)

    class Changes(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("opened", "closed_no_write") or (event.is_directory and event.event_type == "modified"):
                return
            paths = [p for p in (event.src_path, getattr(event, "dest_path", "")) if p]
            if any(Path(p).is_relative_to(index_dir) for p in paths):
                return
            # NAS thumbnails written into @eaDir, a hidden file: not a change to the collection
            paths = [p for p in paths if not (Path(p).is_relative_to(folder) and
                                              exclusions.covers(Path(p).relative_to(folder).as_posix()))]
            if not paths:
                return
            # a symlinked folder is a folder of the collection, though its link's events are a file's
            if event.is_directory or any(is_image_path(p) or p in links or _links_to_folder(p) for p in paths):
                changed.set()

    if isinstance(model, str):
        from otclip.engine import load_model

        model = load_model(model)  # once: a watcher re-indexes many times
    if poll is None:
        remote = remote_filesystem(folder)
        poll = REMOTE_POLL_SECONDS if remote else 0.0
        if remote:
            print(f"otclip watch: {folder} is on {remote}, where changes made on another machine raise no event here: "
                  f"looking for changes every {poll:g} s (--poll S sets how often, --poll 0 waits for events)",
                  file=sys.stderr, flush=True)
    observer, handler, watched = _observer(folder, index_dir, exclusions, poll), Changes(), {}

    def follow_links() -> None:  # the system's events do not reach into symlinked folders; a poll follows them
        nonlocal links
        links = _linked_folders(folder, exclusions)
        if not poll:
            _watch_outside(observer, handler, set(links.values()) - {None}, watched)

    def watch_folder() -> None:  # (again): the events of a folder are its inode's, not its path's
        observer.unschedule_all()
        watched.clear()
        observer.schedule(handler, str(folder), recursive=True)
        follow_links()

    watch_folder()
    identity = _identity(folder)
    observer.start()  # before the first run: nothing that changes during it is missed
    runs = 0
    try:
        while True:
            try:
                summary = index_images(folder, index_dir, model, **index_options)
            except EmptySourceError as exc:  # a drive unmounted, or every photo moved out: the index waits for them
                print(f"otclip watch: {exc}", file=sys.stderr, flush=True)
            else:
                if report is not None:
                    report(summary)
                else:
                    print(summary.line(), flush=True)
                runs += 1
            follow_links()
            while not changed.wait(0.2):
                if stop.is_set():
                    return runs
                if (now := _identity(folder)) != identity:  # a drive unplugged, or plugged in again
                    identity = now
                    if now is None:
                        print(f"otclip watch: {folder} is gone (a drive unplugged?): waiting for it to come back",
                              file=sys.stderr, flush=True)
                        continue
                    try:
                        watch_folder()
                    except OSError:  # gone again already
                        identity = None
                        continue
                    changed.set()  # what it holds now is not what the index holds
            while changed.is_set():  # settle: wait for a quiet moment, so a copy of 1000 photos is one run
                changed.clear()
                deadline = time.monotonic() + settle
                while time.monotonic() < deadline and not changed.is_set() and not stop.is_set():
                    time.sleep(0.05)
            if stop.is_set():
                return runs
    finally:
        observer.stop()
        observer.join()


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder at this path now; None while there is none. A drive mounted again, or a folder
    replaced (moved away and made anew), is another folder at the same path, which the events of the old one do not
    cover."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _linked_folders(folder: Path, exclusions: Exclusions) -> dict[str, str | None]:
    """The symlinked folders that `otclip index` follows below `folder`: link -> its target where that lies outside
    the folder (which the folder's watch does not cover), else None."""
    inside = Path(os.path.realpath(folder))
    links = (path for path, _, _ in walk_folders(folder, exclusions) if os.path.islink(path))
    return {link: None if Path(target := os.path.realpath(link)).is_relative_to(inside) else target for link in links}


def _links_to_folder(path: str) -> bool:
    return os.path.islink(path) and os.path.isdir(path)


def _watch_outside(observer, handler, targets: set[str], watched: dict) -> None:
    """Watch each of `targets` that is not yet (`watched`: target -> its watch), and no longer those that went."""
    for target in targets - watched.keys():
        try:
            watched[target] = observer.schedule(handler, target, recursive=True)
        except OSError:  # gone since the walk; the next run's walk says what is there
            pass
    for target in watched.keys() - targets:
        observer.unschedule(watched.pop(target))


def _observer(folder: Path, index_dir: Path, exclusions: Exclusions, poll: float):
    """watchdog's observer of the system's events, or with `poll` one that lists the folder every `poll` seconds
    and compares (a stat a file, as `otclip index` makes), through `_listing`."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserverVFS

    if not poll:
        return Observer()
    return PollingObserverVFS(os.stat, _listing(folder, index_dir, exclusions), polling_interval=poll)


def _listing(folder: Path, index_dir: Path, exclusions: Exclusions) -> Callable[[str], Iterator[os.DirEntry]]:
    """`os.scandir` for the polling observer, less what the exclusions leave out, the index directory (a Synology
    share's @eaDir holds five thumbnails a photo, each a stat a poll) and a symlinked folder that leads back to one on
    the way to it: the observer follows symlinks, and its walk of a loop ends only when the kernel refuses a path 40
    links deep, having listed the tree again at every level (a link to the folder itself: each photo 40 times; two
    such links, 2^40). `otclip index` cuts loops too."""
    def loops(path: str, entry: os.DirEntry) -> bool:
        if not (entry.is_symlink() and entry.is_dir()):
            return False
        target, here = os.path.realpath(entry.path), Path(path)
        return any(os.path.realpath(p) == target for p in (here, *here.parents) if p.is_relative_to(folder))

    def listdir(path: str) -> Iterator[os.DirEntry]:
        below = Path(path).relative_to(folder).as_posix()
        with os.scandir(path) as entries:
            for entry in entries:
                relative = entry.name if below == "." else f"{below}/{entry.name}"
                if not (exclusions.excludes(relative) or Path(entry.path) == index_dir or loops(path, entry)):
                    yield entry

    return listdir

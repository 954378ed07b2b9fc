"""How `otclip watch` learns that a folder's photos changed: the system's events (watchdog: inotify on Linux, FSEvents,
ReadDirectoryChangesW), or a listing every few seconds where events do not come.

Events do not come, or stop coming, in five cases, each handled here:
- a folder on a network share (NFS, SMB, SSHFS; a VM's or WSL's mount of the host's disk): another machine's change
  raises no event here (gorakhargosh/watchdog#409), so such a folder (`filesystems.remote_filesystem`) is listed every
  REMOTE_POLL_SECONDS instead (watchdog's polling observer), past what the exclusions leave out (`_listing`);
- more folders than the system allows inotify watches (`fs.inotify.max_user_watches`; a Synology share has a folder
  of thumbnails per photo, each watched): listed instead, likewise;
- a symlinked folder, which `otclip index` follows: events do not reach through the link, so its target is watched
  too when it lies outside the folder;
- a folder replaced at its path (a drive unplugged and plugged in again, a folder moved away and made anew): events
  belong to the inode, so the path's identity is looked at and the new folder watched (`check_identity`).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from otclip.engine.exclusions import Exclusions
from otclip.engine.image_folders import walk_folders
from otclip.engine.image_paths import is_image_path

from .filesystems import remote_filesystem

REMOTE_POLL_SECONDS = 30.0  # how often a folder is listed where events do not come, by default
_WATCH_LIMITS = (errno.ENOSPC, errno.EMFILE)  # inotify's watch and instance limits, as watchdog raises them


class FolderObserver:
    """Sets `changed` when an image, a folder or a symlinked folder of the collection below `folder` changes (not
    what `exclusions` leaves out, nor the index directory). `poll`: seconds between listings (0: the system's events;
    None: REMOTE_POLL_SECONDS on a network share, else events)."""

    def __init__(self, folder: Path, index_dir: Path, exclusions: Exclusions, poll: float | None,
                 changed: threading.Event) -> None:
        from watchdog.events import FileSystemEventHandler

        self.folder, self.index_dir, self.exclusions, self.changed = folder, index_dir, exclusions, changed
        if poll is None:
            remote = remote_filesystem(folder)
            poll = REMOTE_POLL_SECONDS if remote else 0.0
            if remote:
                _say(f"{folder} is on {remote}, where changes made on another machine raise no event here: looking "
                     f"for changes every {poll:g} s (--poll S sets how often, --poll 0 waits for events)")
        self.poll = poll
        self.links: dict[str, str | None] = {}  # the collection's symlinked folders (`linked_folders`)
        self._links_stale = True  # a folder or a link changed since `links` was read: read them again
        self._outside: dict[str, object] = {}  # target outside the folder -> its watch
        self._identity = identity(folder)
        self._running = False
        observer = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if observer.is_change(event):
                    changed.set()

        self._handler = Handler()
        self._observer = self._new_observer()

    def start(self) -> None:
        """Watch the folder (before its first run: nothing that changes during the run is missed)."""
        self._guarded(self._watch_folder)
        self._running = True
        self._guarded(lambda: self._observer.start())

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join()

    def is_change(self, event) -> bool:
        """Whether a watchdog event is a change to the collection."""
        if event.event_type in ("opened", "closed_no_write") or (event.is_directory and event.event_type == "modified"):
            return False
        paths = [p for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        if any(Path(p).is_relative_to(self.index_dir) for p in paths):
            return False
        # NAS thumbnails written into @eaDir, a hidden file: not a change to the collection
        paths = [p for p in paths if not (Path(p).is_relative_to(self.folder) and
                                          self.exclusions.covers(Path(p).relative_to(self.folder).as_posix()))]
        if not paths:
            return False
        # a symlinked folder is a folder of the collection, though its link's events are a file's
        if event.is_directory or any(p in self.links or _links_to_folder(p) for p in paths):
            self._links_stale = True
            return True
        return any(is_image_path(p) for p in paths)

    def follow_links(self) -> None:
        """Read the collection's symlinked folders again, after a run that followed a change of folders or links (a
        walk of the whole folder: not after photos alone came or went), and watch their targets outside the folder.
        Not while listing: a listing follows links itself, and sees a link as the folder it leads to."""
        if not self.poll and self._links_stale:
            self._links_stale = False  # before the walk: a change during it marks them stale again
            self.links = linked_folders(self.folder, self.exclusions)
            self._guarded(self._watch_outside)

    def use_exclusions(self, exclusions: Exclusions) -> None:
        """Leave out what `exclusions` leaves out from now on (another run changed those the index keeps); the
        symlinked folders are read again at the next `follow_links`, since the exclusions choose them too."""
        if exclusions != self.exclusions:
            self.exclusions, self._links_stale = exclusions, True

    def check_identity(self) -> None:
        """Look at the folder at the path (five times a second, between runs): gone since the last look, it is said in
        one line; back, or another, it is watched again and `changed` set (what it holds is not what the index
        holds)."""
        now = identity(self.folder)
        if now == self._identity:
            return
        self._identity = now
        if now is None:
            _say(f"{self.folder} is gone (a drive unplugged?): waiting for it to come back")
            return
        try:
            self._guarded(self._watch_folder)
        except OSError:  # gone again already
            self._identity = None
            return
        self.changed.set()

    # --- inside -----------------------------------------------------------------------------------
    def _new_observer(self):
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserverVFS

        if not self.poll:
            return Observer()
        return PollingObserverVFS(os.stat, _listing(self.folder, self.index_dir, lambda: self.exclusions),
                                  polling_interval=self.poll)

    def _watch_folder(self) -> None:
        self._observer.unschedule_all()
        self._outside.clear()
        self._links_stale = True
        self._observer.schedule(self._handler, str(self.folder), recursive=True)
        self.follow_links()

    def _watch_outside(self) -> None:
        targets = set(self.links.values()) - {None}
        for target in targets - self._outside.keys():
            try:
                self._outside[target] = self._observer.schedule(self._handler, target, recursive=True)
            except OSError as exc:
                if exc.errno in _WATCH_LIMITS:
                    raise
                # gone since the walk; the next run's walk says what is there
        for target in self._outside.keys() - targets:
            self._observer.unschedule(self._outside.pop(target))

    def _guarded(self, step: Callable[[], None]) -> None:
        """`step`, and where it meets inotify's limits, the same on a listing every REMOTE_POLL_SECONDS instead."""
        try:
            step()
        except OSError as exc:
            if self.poll or exc.errno not in _WATCH_LIMITS:
                raise
            limit = _read_number("/proc/sys/fs/inotify/max_user_watches")
            _say(f"{self.folder}: the system allows no more inotify watches ({exc.strerror}; a watch a folder, "
                 f"fs.inotify.max_user_watches = {limit or '?'}): looking for changes every {REMOTE_POLL_SECONDS:g} s "
                 "instead (or raise it: sudo sysctl fs.inotify.max_user_watches=524288)")
            if self._observer.is_alive():
                self._observer.stop()
                self._observer.join()
            self.poll = REMOTE_POLL_SECONDS
            self._observer = self._new_observer()
            self._watch_folder()
            if self._running:
                self._observer.start()


def identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder at this path now; None while there is none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def linked_folders(folder: Path, exclusions: Exclusions) -> dict[str, str | None]:
    """The symlinked folders that `otclip index` follows below `folder`: link -> its target where that lies outside
    the folder (which the folder's watch does not cover), else None."""
    inside = Path(os.path.realpath(folder))
    links = (path for path, _, _ in walk_folders(folder, exclusions) if os.path.islink(path))
    return {link: None if Path(target := os.path.realpath(link)).is_relative_to(inside) else target for link in links}


def _links_to_folder(path: str) -> bool:
    return os.path.islink(path) and os.path.isdir(path)


def _say(line: str) -> None:
    print(f"otclip watch: {line}", file=sys.stderr, flush=True)


def _read_number(path: str) -> int | None:
    try:
        return int(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _listing(folder: Path, index_dir: Path,
             exclusions: Callable[[], Exclusions]) -> Callable[[str], Iterator[os.DirEntry]]:
    """`os.scandir` for the polling observer, less what the exclusions (as they are at each listing) leave out, the
    index directory (a Synology share's @eaDir holds five thumbnails a photo, each a stat a poll) and a symlinked
    folder that leads back to one on the way to it: the observer follows symlinks, and its walk of a loop ends only
    when the kernel refuses a path 40 links deep, having listed the tree again at every level (a link to the folder
    itself: each photo 40 times; two such links, 2^40). `otclip index` cuts loops too."""
    def loops(path: str, entry: os.DirEntry) -> bool:
        if not (entry.is_symlink() and entry.is_dir()):
            return False
        target, here = os.path.realpath(entry.path), Path(path)
        return any(os.path.realpath(p) == target for p in (here, *here.parents) if p.is_relative_to(folder))

    def listdir(path: str) -> Iterator[os.DirEntry]:
        below, leaves_out = Path(path).relative_to(folder).as_posix(), exclusions()
        with os.scandir(path) as entries:
            for entry in entries:
                relative = entry.name if below == "." else f"{below}/{entry.name}"
                if not (leaves_out.excludes(relative) or Path(entry.path) == index_dir or loops(path, entry)):
                    yield entry

    return listdir

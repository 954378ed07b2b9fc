"""`otclip watch FOLDER --out DIR`: keep an index current while photos come and go.

The folder is indexed once, then again after each burst of changes (when `settle` seconds pass with no new
change), through the same incremental `index_images`: only new or changed files are embedded, removed ones
are dropped, and each run publishes a new generation that a running `otclip serve` picks up at its next
query. What counts as a change, and how it is learnt (events, or listings where events do not come), is
`folder_observer.FolderObserver`'s.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from otclip.engine.errors import IndexDirectoryError
from otclip.engine.exclusions import Exclusions
from otclip.engine.index_directory import IndexDirectory, model_of

from .folder_observer import FolderObserver
from .pipeline import EmptySourceError, IndexingSummary, index_images

if TYPE_CHECKING:
    from otclip.engine import LoadedModel


KEPT_EXCLUSIONS_EVERY = 1.0  # seconds between looks at the exclusions the index keeps, while the watch waits


def _kept_exclusions(directory: IndexDirectory, current: Exclusions) -> Exclusions:
    """The exclusions the index keeps now: an `otclip index --exclude ...` run beside the watch changes them, and
    with them what is a change to the collection. `current` while the manifest cannot be read (the next run says
    why)."""
    try:
        return directory.kept_exclusions()
    except IndexDirectoryError:
        return current


def watch(folder: str | Path, index_dir: str | Path, model: str | LoadedModel | None, settle: float = 2.0,
          stop: threading.Event | None = None, report: Callable[[IndexingSummary], None] | None = None,
          poll: float | None = None, **index_options) -> int:
    """Index `folder` into `index_dir` now and after every burst of changes, until `stop` is set (or Ctrl-C).
    `report` gets each run's summary. `poll`: list the folder every `poll` seconds for changes rather than wait for
    the system's events (0: events; None: `FolderObserver`'s choice). Returns how many runs were made."""
    if poll is not None and not (math.isfinite(poll) and poll >= 0):
        raise ValueError(f"--poll {poll:g}: expected seconds between listings (0: wait for the system's events)")
    if not (math.isfinite(settle) and settle >= 0):
        raise ValueError(f"--settle {settle:g}: expected seconds without changes before a run (0: at once)")
    folder, index_dir = Path(folder).resolve(), Path(index_dir).resolve()
    given: Exclusions | None = index_options.get("exclusions")
    directory = IndexDirectory(index_dir)
    exclusions = directory.kept_exclusions() if given is None else given  # None: those the index keeps
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    stop = stop or threading.Event()
    changed = threading.Event()
    if model is None or isinstance(model, str):
        from otclip.engine import load_model

        model = load_model(model_of(directory) if model is None else model)  # once: a watcher re-indexes many times
    observer = FolderObserver(folder, index_dir, exclusions, poll, changed)
    observer.start()
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
            observer.follow_links()
            looked = time.monotonic()
            while not changed.wait(0.2):
                if stop.is_set():
                    return runs
                observer.check_identity()  # a drive unplugged, or plugged in again
                if given is None and time.monotonic() - looked >= KEPT_EXCLUSIONS_EVERY:
                    looked = time.monotonic()
                    observer.use_exclusions(_kept_exclusions(directory, observer.exclusions))
                    observer.follow_links()
            while changed.is_set():  # settle: wait for a quiet moment, so a copy of 1000 photos is one run
                changed.clear()
                deadline = time.monotonic() + settle
                while time.monotonic() < deadline and not changed.is_set() and not stop.is_set():
                    time.sleep(0.05)
            if stop.is_set():
                return runs
    finally:
        observer.stop()

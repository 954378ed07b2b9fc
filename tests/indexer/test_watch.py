"""`otclip watch` (#11): a folder's changes reach the index, and a running searcher, as they happen."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from otclip.engine.exclusions import Exclusions
from otclip.engine.search import IndexSearcher
from otclip.indexer.folder_observer import _listing, linked_folders
from otclip.indexer.pipeline import IndexingSummary
from otclip.indexer.watch import watch


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the index did not follow the folder in time")
        time.sleep(0.2)


@contextmanager
def watching(photos, index, model, poll: float | None = None) -> Iterator[tuple[list[IndexingSummary], threading.Thread]]:
    """`watch` in a thread (settle 0.5 s), as `otclip watch` runs, stopped and joined on leaving; yields the summaries
    of its runs as they come, and the thread."""
    stop, runs = threading.Event(), []
    watcher = threading.Thread(target=watch, args=(photos, index, model), daemon=True,
                               kwargs=dict(settle=0.5, stop=stop, report=runs.append, progress=False, workers=0,
                                           query_models=False, poll=poll))
    watcher.start()
    try:
        yield runs, watcher
    finally:
        stop.set()
        watcher.join(30)
    assert not watcher.is_alive()


def test_new_changed_and_removed_photos_reach_a_running_searcher(tmp_path, sample_dir, default_model, capfd):
    photos, index = tmp_path / "photos", tmp_path / "photos" / ".index"  # the index inside the watched folder
    photos.mkdir()
    for name in ("rocket", "coffee"):
        shutil.copy(sample_dir / f"{name}.jpg", photos / f"{name}.jpg")
    with watching(photos, index, default_model) as (runs, watcher):
        wait_for(lambda: len(runs) == 1)
        searcher = IndexSearcher(index, model=default_model)  # as `otclip serve` holds it

        def top_of(query: str) -> str:
            return searcher.search(query, k=1).results[0].path

        assert runs[0].total == 2 and not top_of("a cat").endswith("chelsea.jpg")
        for i in range(3):  # a burst: one re-index after it settles
            shutil.copy(sample_dir / "chelsea.jpg", photos / f"chelsea-{i}.jpg")
        # the searcher sees a run's index as soon as it is published, before the run reports: wait for both
        wait_for(lambda: "chelsea" in top_of("a cat") and any(r.embedded for r in runs[1:]))
        # an event that arrives while a run is under way (a late close of a copied file) brings one more run,
        # which finds nothing to do: the burst's work is one run all the same
        working = [r for r in runs[1:] if r.embedded or r.duplicates or r.removed]
        assert len(working) == 1 and working[0].embedded == 1 and working[0].duplicates == 2
        done = len(runs)
        for i in range(3):
            (photos / f"chelsea-{i}.jpg").unlink()
        wait_for(lambda: "chelsea" not in top_of("a cat") and any(r.removed for r in runs[done:]))
        working = [r for r in runs[done:] if r.embedded or r.duplicates or r.removed]
        assert len(working) == 1 and working[0].removed == 3 and working[0].total == 2
        time.sleep(1.5)  # quiet: any late run has come
        done = len(runs)
        (photos / "notes.txt").write_text("not a photo")  # not a change to the collection
        thumbs = photos / "@eaDir" / "rocket.jpg"  # nor a NAS's thumbnails of a photo
        thumbs.mkdir(parents=True)
        shutil.copy(sample_dir / "rocket.jpg", thumbs / "SYNOPHOTO_THUMB_S.jpg")
        time.sleep(1.5)
        assert len(runs) == done
        for name in ("rocket", "coffee"):  # every photo gone (a drive unmounted): refused, the watcher goes on
            (photos / f"{name}.jpg").unlink()
        wait_for(lambda: "no images in it, but the index holds 2; nothing was removed" in capfd.readouterr().err)
        assert len(runs) == done and len(searcher.search("a rocket", k=5).results) == 2 and watcher.is_alive()
        shutil.copy(sample_dir / "rocket.jpg", photos / "rocket.jpg")  # back: the next run mirrors the folder
        wait_for(lambda: len(runs) > done and runs[-1].total == 1 and runs[-1].removed == 1)


@pytest.mark.parametrize("poll", [None, 0.3], ids=["events", "listings"])
def test_a_watch_leaves_out_what_the_index_keeps_excluded(tmp_path, sample_dir, default_model, poll):
    """The exclusions an earlier run was given are kept with the index: a watch started without them neither
    indexes what they leave out nor runs again for a change there; a run beside it that keeps others changes what
    the watch takes for a change, whether it waits for the system's events or lists the folder."""
    from otclip.indexer.pipeline import index_images

    photos, index = tmp_path / "photos", tmp_path / "index"
    (photos / "Screenshots").mkdir(parents=True)
    shutil.copy(sample_dir / "rocket.jpg", photos / "rocket.jpg")
    shutil.copy(sample_dir / "coffee.jpg", photos / "Screenshots" / "coffee.jpg")
    kept = index_images(photos, index, default_model, exclusions=Exclusions(("Screenshots",)), progress=False,
                        workers=0, query_models=False)
    assert kept.total == 1
    with watching(photos, index, default_model, poll) as (runs, _):
        wait_for(lambda: len(runs) == 1)
        assert runs[0].total == 1 and runs[0].removed == 0
        shutil.copy(sample_dir / "chelsea.jpg", photos / "Screenshots" / "chelsea.jpg")
        time.sleep(1.5)
        assert len(runs) == 1
        shutil.copy(sample_dir / "chelsea.jpg", photos / "chelsea.jpg")
        wait_for(lambda: len(runs) > 1 and runs[-1].total == 2)
        # a run beside the watch keeps other exclusions: the watch's idea of a change follows them
        time.sleep(1.5)  # any late run has come
        before = len(runs)
        beside = index_images(photos, index, default_model, exclusions=Exclusions(("Drafts",)), progress=False,
                              workers=0, query_models=False)
        assert beside.total == 4  # the screenshots are in again
        if poll is not None:  # a listing then finds the screenshots, new to it: one run, which has nothing to do (a
            wait_for(lambda: len(runs) > before)  # fresh listing in its place could miss a photo added since the last)
        time.sleep(2.0)  # the watch has looked at the kept exclusions (once a second), and any late run has come
        done = len(runs)
        assert done <= before + (poll is not None) and not any(r.embedded or r.removed for r in runs[before:])
        (photos / "Drafts").mkdir()
        shutil.copy(sample_dir / "rocket.jpg", photos / "Drafts" / "rocket-edit.jpg")
        time.sleep(1.5)
        assert len(runs) == done  # no longer a change
        shutil.copy(sample_dir / "camera.jpg", photos / "Screenshots" / "camera.jpg")
        wait_for(lambda: len(runs) > done and runs[-1].total == 5 and runs[-1].embedded == 1)


def test_a_change_in_a_symlinked_folder_elsewhere_is_seen(tmp_path, sample_dir, default_model, monkeypatch):
    """`otclip index` follows symlinked folders (~/Pictures/Phone -> /media/card/DCIM); the system's events for a
    folder do not reach into them, so the watch watches each one's target too, as long as the link is there. The
    links are read again (a walk of the whole folder) after a change of links or folders, not of photos alone."""
    from otclip.indexer import folder_observer

    walks = []
    monkeypatch.setattr(folder_observer, "linked_folders", lambda *a: walks.append(a) or linked_folders(*a))
    photos, card = tmp_path / "photos", tmp_path / "card" / "DCIM"
    photos.mkdir()
    card.mkdir(parents=True)
    shutil.copy(sample_dir / "rocket.jpg", photos / "rocket.jpg")
    (photos / "Phone").symlink_to(card)
    with watching(photos, tmp_path / "index", default_model) as (runs, _):
        wait_for(lambda: len(runs) == 1)
        assert runs[0].total == 1 and len(walks) == 1
        shutil.copy(sample_dir / "chelsea.jpg", card / "IMG_1.jpg")
        wait_for(lambda: len(runs) > 1 and runs[-1].total == 2, seconds=20)
        assert len(walks) == 1  # a photo came: the links are as they were
        (photos / "Phone").unlink()  # no longer part of the collection: nor watched
        wait_for(lambda: runs[-1].total == 1)
        time.sleep(1.5)
        done = len(runs)
        shutil.copy(sample_dir / "coffee.jpg", card / "IMG_2.jpg")
        time.sleep(1.5)
        assert len(runs) == done
        (photos / "Phone").symlink_to(card)  # linked again: a run, and the card is watched again
        wait_for(lambda: runs[-1].total == 3)
        (card / "IMG_2.jpg").unlink()
        wait_for(lambda: runs[-1].total == 2 and runs[-1].removed == 1)


def test_a_folder_gone_and_back_is_watched_again(tmp_path, sample_dir, default_model, capfd):
    """The system's events follow a folder's inode, not its path: after a drive was unplugged and plugged in again
    (mounted again at the same path: checked by hand with tmpfs) or a folder moved away and made anew, the watch kept
    listening to the old one and missed every change. It now looks at the path's identity, says when the folder is
    gone, and watches the new one, indexing what it holds."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sample_dir / "rocket.jpg", photos / "rocket.jpg")
    err: list[str] = []
    with watching(photos, tmp_path / "index", default_model) as (runs, _):
        wait_for(lambda: len(runs) == 1)
        shutil.move(photos, tmp_path / "unplugged")
        wait_for(lambda: err.append(capfd.readouterr().err) or "is gone (a drive unplugged?)" in "".join(err))
        photos.mkdir()  # another card in the reader
        shutil.copy(sample_dir / "chelsea.jpg", photos / "chelsea.jpg")
        wait_for(lambda: runs[-1].total == 1 and runs[-1].removed == 1)
        shutil.copy(sample_dir / "coffee.jpg", photos / "coffee.jpg")
        wait_for(lambda: runs[-1].total == 2)


def test_past_the_systems_inotify_watches_the_folder_is_listed(tmp_path, sample_dir, default_model, monkeypatch, capfd):
    """inotify takes a watch a folder, and the system allows so many (fs.inotify.max_user_watches: 8192 on older
    kernels; a Synology share holds a folder of thumbnails a photo): past the limit the watch stopped, and the command
    said the disk was full. It now lists the folder instead, and says why in one line."""
    import ctypes
    import errno

    from watchdog.observers import inotify_c

    real, added = inotify_c.inotify_add_watch, []

    def two_watches(fd, path, mask):  # the system's limit, reached at the third folder
        added.append(path)
        if len(added) > 2:
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return real(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", two_watches)
    monkeypatch.setattr("otclip.indexer.folder_observer.REMOTE_POLL_SECONDS", 0.3)
    photos = tmp_path / "photos"
    for year in ("2019", "2020", "2021"):
        (photos / year).mkdir(parents=True)
    shutil.copy(sample_dir / "rocket.jpg", photos / "2019" / "rocket.jpg")
    with watching(photos, tmp_path / "index", default_model) as (runs, _):
        wait_for(lambda: len(runs) == 1)
        assert "the system allows no more inotify watches (inotify watch limit reached" in capfd.readouterr().err
        shutil.copy(sample_dir / "chelsea.jpg", photos / "2021" / "chelsea.jpg")
        wait_for(lambda: runs[-1].total == 2)


def test_a_folder_on_a_network_share_is_polled(tmp_path, sample_dir, default_model, monkeypatch, capfd):
    """inotify raises no event for a change another machine makes on an NFS or SMB share: there the watch lists the
    folder every --poll seconds instead (the system's observer is not even made here), leaving out what the exclusions
    leave out, and says so in one line."""
    import watchdog.observers

    from otclip.indexer import filesystems

    class NoEvents:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("the system's events were waited for on a network share")

    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    shutil.copy(sample_dir / "rocket.jpg", photos / "rocket.jpg")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\n//nas/photos {tmp_path} cifs rw,vers=3.0 0 0\n")
    monkeypatch.setattr(filesystems, "MOUNT_TABLE", str(mounts))
    monkeypatch.setattr(watchdog.observers, "Observer", NoEvents)
    monkeypatch.setattr("otclip.indexer.folder_observer.REMOTE_POLL_SECONDS", 0.3)
    with watching(photos, index, default_model) as (runs, _):
        wait_for(lambda: len(runs) == 1)
        assert f"{photos} is on cifs, where changes made on another machine raise no event here: looking for changes " \
               "every 0.3 s" in capfd.readouterr().err
        thumbs = photos / "@eaDir" / "rocket.jpg"  # a NAS's thumbnails: not listed
        thumbs.mkdir(parents=True)
        shutil.copy(sample_dir / "rocket.jpg", thumbs / "SYNOPHOTO_THUMB_S.jpg")
        time.sleep(1.5)
        assert len(runs) == 1
        shutil.copy(sample_dir / "chelsea.jpg", photos / "chelsea.jpg")
        wait_for(lambda: len(runs) > 1 and runs[-1].total == 2)
        done = len(runs)
        (photos / "rocket.jpg").unlink()
        wait_for(lambda: len(runs) > done and runs[-1].total == 1 and runs[-1].removed == 1)
        card = tmp_path / "card"  # a symlinked folder: listed through the link
        card.mkdir()
        (photos / "Phone").symlink_to(card)
        shutil.copy(sample_dir / "coffee.jpg", card / "IMG_1.jpg")
        wait_for(lambda: runs[-1].total == 2)
        (photos / "Phone").unlink()
        wait_for(lambda: runs[-1].total == 1)
    with pytest.raises(ValueError, match="--poll -1"):
        watch(photos, index, default_model, poll=-1)
    (photos / ".index").mkdir()  # the index in the folder, a hidden file, an excluded folder: never listed
    (photos / "._chelsea.jpg").write_bytes(b"\x00\x05\x16\x07")
    listing = _listing(photos, photos / ".index", lambda: Exclusions(("private",), include_hidden=True))
    (photos / "2019" / "private").mkdir(parents=True)
    assert sorted(e.name for e in listing(str(photos))) == ["._chelsea.jpg", "2019", "chelsea.jpg"]
    assert [e.name for e in listing(str(photos / "2019"))] == []
    assert sorted(e.name for e in _listing(photos, index, Exclusions)(str(photos))) == ["2019", "chelsea.jpg"]


def test_a_polled_folder_with_symlink_loops_is_listed_to_its_end(tmp_path):
    """The polling observer follows symlinked folders; one that leads back to a folder on the way to it (a link to the
    folder itself, two folders linked to each other) is not followed: walked, a loop lists the tree again at every
    level until the kernel refuses a path 40 links deep."""
    from watchdog.utils.dirsnapshot import DirectorySnapshot

    photos = tmp_path / "photos"
    for name in ("a", "b", "elsewhere"):
        (photos / name).mkdir(parents=True)
        (photos / name / f"{name}.jpg").write_bytes(b"")
    (photos / "again").symlink_to(photos)
    (photos / "a" / "to-b").symlink_to(photos / "b")
    (photos / "b" / "to-a").symlink_to(photos / "a")
    (photos / "a" / "to-elsewhere").symlink_to(photos / "elsewhere")  # no loop: followed
    snapshot = DirectorySnapshot(str(photos), listdir=_listing(photos, tmp_path / "index", Exclusions))
    assert sorted(Path(p).relative_to(photos).as_posix() for p in snapshot.paths) == [
        ".", "a", "a/a.jpg", "a/to-b", "a/to-b/b.jpg", "a/to-elsewhere", "a/to-elsewhere/elsewhere.jpg", "b", "b/b.jpg",
        "b/to-a", "b/to-a/a.jpg", "b/to-a/to-elsewhere", "b/to-a/to-elsewhere/elsewhere.jpg", "elsewhere",
        "elsewhere/elsewhere.jpg"]


def test_the_filesystem_of_a_folder_is_its_deepest_mount_points():
    """A folder's filesystem is that of the deepest mount point above it (a local disk mounted inside a share is
    local); spaces in mount points are octal escapes in the table."""
    from otclip.indexer.filesystems import filesystem_type

    table = ("/dev/sda1 / ext4 rw 0 0\n//nas/photos /mnt/nas cifs rw 0 0\n/dev/sdb1 /mnt/nas/local ext4 rw 0 0\n"
             "server:/export /media/My\\040Photos nfs4 rw 0 0\nC:\\134 /mnt/c 9p rw 0 0\n")
    assert filesystem_type("/home/me/Pictures", table) == "ext4"
    assert filesystem_type("/mnt/nas/2019/summer", table) == "cifs"
    assert filesystem_type("/mnt/nas/local/2019", table) == "ext4"
    assert filesystem_type("/mnt/nasty", table) == "ext4"  # a mount point is a folder, not a prefix of a name
    assert filesystem_type("/media/My Photos/2020", table) == "nfs4"
    assert filesystem_type("/mnt/c/Users/me/Pictures", table) == "9p"  # WSL's view of the Windows disk
    assert filesystem_type("relative", "") is None


def test_watching_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        watch(tmp_path / "nothing", tmp_path / "ix", "effnet-minilm")


def test_the_commands_poll_flag_reaches_the_watch(tmp_path, capsys):
    """`otclip watch --poll S` is the watch's `poll` (a bad value is one line, exit 2, before the folder is looked at
    or a model loads)."""
    from otclip.main import main

    assert main(["watch", str(tmp_path / "photos"), "--out", str(tmp_path / "ix"), "--poll", "-5"]) == 2
    assert capsys.readouterr().err.strip() == \
        "otclip watch: --poll -5: expected seconds between listings (0: wait for the system's events)"

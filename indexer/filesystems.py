"""Which filesystem a folder lives on, for `watch`: inotify sees only the changes this machine's kernel makes, so a
folder on a network share (NFS, SMB/CIFS, SSHFS), a virtual machine's or WSL's mount of the host's disk raises no
event when another machine, or the host, adds a photo (watchdog's README, caveats; gorakhargosh/watchdog#409).
Such a folder is polled instead."""

from __future__ import annotations

import os
from pathlib import Path

# filesystems whose changes made elsewhere raise no inotify event here: network shares, FUSE clients of remote
# stores, and the host's folders as a virtual machine or WSL mounts them
REMOTE_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs", "lustre", "gpfs", "davfs", "9p",
    "drvfs", "vboxsf", "virtiofs", "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
    "fuse.vmhgfs-fuse", "fuse.davfs2",
})
MOUNT_TABLE = "/proc/self/mounts"


def _unescape(field: str) -> str:
    """A mount table field with its octal escapes (`\\040` for a space, `\\011` a tab, `\\134` a backslash) read."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(folder: str | Path, table: str) -> str | None:
    """The type of the filesystem `folder` (an absolute path) is on, as `table` (the text of a Linux mount table,
    /proc/self/mounts) gives it: that of the deepest mount point above it; None if none is."""
    best, kind = -1, None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(_unescape(fields[1]))
        if Path(folder).is_relative_to(point) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def remote_filesystem(folder: str | Path) -> str | None:
    """The type of `folder`'s filesystem if its changes made elsewhere raise no event here (REMOTE_FILESYSTEMS);
    None otherwise, and where there is no mount table to read (macOS and Windows: their events are used)."""
    try:
        with open(MOUNT_TABLE, encoding="utf-8", errors="surrogateescape") as f:
            kind = filesystem_type(os.path.realpath(folder), f.read())
    except OSError:
        return None
    return kind if kind in REMOTE_FILESYSTEMS else None

"""Which folders and files below an indexed folder are not part of the collection.

NAS and operating systems keep their own thumbnails, trash and metadata beside the photos, under image names:
Synology's `@eaDir/IMG_1.JPG/SYNOPHOTO_THUMB_XL.jpg` (five per photo), its `#recycle` and `#snapshot`, QNAP's
`.@__thumb`, Windows' `$RECYCLE.BIN` and `System Volume Information`, macOS's AppleDouble `._IMG_1.JPG` beside each
photo copied to a FAT, exFAT or SMB drive (not images: each would be reported as broken), `.Trashes`,
`.thumbnails`. Indexed, they fill the results with copies of every photo. Skipped by default, as immich and rclip
do (immich-app/immich#12566: `@eaDir`, `._*`; yurijmikhalevich/rclip#304: hidden files and folders, `System Volume
Information`); `--exclude PATTERN` adds the user's own, `--include-hidden` keeps what starts with a dot. An index keeps
the last ones it was given (`IndexDirectory.keep_exclusions`): a later run without them does not bring back what they
left out.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from fnmatch import translate
from functools import cached_property
from pathlib import PurePosixPath

DEFAULT_EXCLUDES = ("@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "node_modules")


@dataclass(frozen=True)
class Exclusions:
    """`patterns`: shell patterns (case-sensitive); one without "/" matches a folder's or a file's name anywhere
    below the indexed folder, one with "/" the path relative to it (`2019/private`, `*/Screenshots`). Names that
    start with a dot are excluded unless `include_hidden`."""

    patterns: tuple[str, ...] = ()
    include_hidden: bool = False

    @cached_property
    def _by_name(self) -> re.Pattern:
        """The patterns without "/" (and the defaults) as one expression over a name (a walk asks for every file)."""
        return re.compile("|".join(translate(p) for p in (*DEFAULT_EXCLUDES, *self.patterns) if "/" not in p))

    @cached_property
    def _by_path(self) -> re.Pattern | None:
        """The patterns with "/", over the relative path; None without any."""
        paths = [translate(p) for p in self.patterns if "/" in p]
        return re.compile("|".join(paths)) if paths else None

    def entry(self) -> dict:
        """As manifest.json keeps them (`IndexDirectory.keep_exclusions`) and `otclip info --json` shows them."""
        return {"patterns": list(self.patterns), "include_hidden": self.include_hidden}

    @classmethod
    def from_entry(cls, entry: dict) -> Exclusions:
        return cls(tuple(entry["patterns"]), entry["include_hidden"])

    def flags(self) -> str:
        """These exclusions as the command-line flags that give them ("" for the defaults)."""
        given = [f"--exclude {shlex.quote(p)}" for p in self.patterns]
        return " ".join([*given, "--include-hidden"] if self.include_hidden else given)

    def excludes(self, relative: str) -> bool:
        """Whether the folder or file at this path (relative to the indexed folder, "/"-separated) is left out
        itself (what is below an excluded folder is left out with it: see `covers`)."""
        name = relative.rpartition("/")[2]
        if name.startswith(".") and not self.include_hidden:
            return True
        return bool(self._by_name.match(name) or (self._by_path is not None and self._by_path.match(relative)))

    def covers(self, relative: str) -> bool:
        """Whether this path or a folder above it (below the indexed folder) is excluded."""
        parts = PurePosixPath(relative).parts
        return any(self.excludes("/".join(parts[: i + 1])) for i in range(len(parts)))

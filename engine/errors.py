"""Errors that carry a message for the user: the CLI prints them in one line, without a traceback."""

from __future__ import annotations

import errno

from .images import ImageDecodeError


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message is one line meant for the user."""


class IndexDirectoryError(RuntimeError):
    """An index directory that is missing, unreadable, or built with another model."""


class NewerIndexFormatError(IndexDirectoryError):
    """An index written by a newer otclip: not damaged, so `check` and `repair` must not rewrite it."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that found no space (OSError ENOSPC/EDQUOT, SQLite's "database or disk is
    full", FAISS's failed fwrite): the user's to fix, and every write is atomic, so nothing is half-written."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(exc) for text in ("No space left on device", "database or disk is full"))


def not_permitted(exc: BaseException) -> bool:
    """Whether `exc` is the file system refusing access (a read-only mount, a folder or file the user may not
    write or read): the user's to fix, like a full disk, and nothing is half-written."""
    return isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


USER_ERRORS: tuple[type[BaseException], ...] = (
    ModelLoadError,
    ImageDecodeError,
    IndexDirectoryError,
    FileNotFoundError,
    ValueError,
)

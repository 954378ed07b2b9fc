"""Errors that carry a message for the user: the CLI prints them in one line, without a traceback."""

from __future__ import annotations

from .images import ImageDecodeError


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message is one line meant for the user."""


class IndexDirectoryError(RuntimeError):
    """An index directory that is missing, unreadable, or built with another model."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ModelLoadError,
    ImageDecodeError,
    IndexDirectoryError,
    FileNotFoundError,
    ValueError,
)

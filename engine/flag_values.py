"""Numeric settings checked as the user gave them: argparse takes any int or float ("nan" and "inf" too), and a value
out of range is read as something else further down (a batch size of -3 indexed nothing, in silence; a negative size
slices from the end; a NaN learning rate trains NaNs). No imports beyond `math`: the CLI's parsers and the training
config read it before anything heavy loads."""

from __future__ import annotations

import math


def check_at_least(flag: str, value: float | None, low: int = 1) -> None:
    """Refuse a count, size, weight or time below `low`, or not a finite number (None: not given), in one line naming
    the flag and the value."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{flag} {value}: expected a finite number")
    if value < low:
        raise ValueError(f"{flag} {value}: " + ("must not be negative" if low == 0 else f"must be at least {low}"))


def check_positive(flag: str, value: float | None, hint: str = "") -> None:
    """Refuse a value that is not a positive finite number (None: not given); `hint` ends the line."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} {value}: must be positive{hint}")

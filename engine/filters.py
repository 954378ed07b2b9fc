"""Which items a search may return: folder, glob, label, any manifest column, date taken, size, orientation.

Every field narrows the set (they are ANDed); an empty Filters passes everything. Each becomes one SQL
condition over the metadata store's `items` table (`Filters.sql`); the searcher then ranks only items
that pass (`IndexSearcher.search`). The date of an image is its EXIF DateTimeOriginal, read at index time,
else its file's modification time, both as local time.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

from .flag_values import check_at_least

ORIENTATIONS = ("landscape", "portrait", "square")
COLUMNS = {"label": "label", "caption": "text", "text": "text", "width": "width", "height": "height",
           "size": "size"}  # names a --where may use that are store columns; any other is a manifest column
TAKEN = "COALESCE(exif_time, mtime_ns / 1e9)"  # the date of an item, in Unix seconds


@dataclass
class Filters:
    path_prefix: str | None = None  # a folder (made absolute): items below it
    path_glob: str | None = None  # a shell pattern over the whole absolute path (`*` also crosses `/`)
    label: str | None = None
    where: dict[str, str | tuple[str | None, str | None]] = field(default_factory=dict)  # column -> value or range
    taken_after: float | None = None  # Unix seconds, inclusive
    taken_before: float | None = None  # Unix seconds, exclusive
    orientation: str | None = None
    min_width: int | None = None
    min_height: int | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation {self.orientation!r}: expected one of {', '.join(ORIENTATIONS)}")
        for column in self.where:
            if not column or '"' in column:
                raise ValueError(f"--where column {column!r}: not a column name")
        if self.path_prefix is not None:
            self.path_prefix = os.path.abspath(os.path.expanduser(self.path_prefix))

    def is_empty(self) -> bool:
        return self == Filters()

    def sql(self) -> tuple[str, list]:
        """(condition, parameters) over `items`; "1" when nothing is filtered."""
        conditions: list[str] = []
        params: list = []
        if self.path_prefix is not None:
            folder = self.path_prefix.rstrip("/") + "/"
            conditions.append("key >= ? AND key < ?")  # a range on the (side, key) index: no scan
            params += [folder, folder[:-1] + chr(ord("/") + 1)]
        for value, condition in ((self.path_glob, "key GLOB ?"), (self.label, "label = ?"),
                                 (self.taken_after, f"{TAKEN} >= ?"), (self.taken_before, f"{TAKEN} < ?"),
                                 (self.min_width, "width >= ?"), (self.min_height, "height >= ?")):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        for column, wanted in self.where.items():
            if isinstance(wanted, tuple):
                numeric = all(v is None or _is_number(v) for v in wanted)
                expr = column_expression(column, "REAL" if numeric else "TEXT")
                for bound, op in zip(wanted, (">=", "<=")):
                    if bound is not None:
                        conditions.append(f"{expr} {op} ?")
                        params.append(float(bound) if numeric else bound)
            else:
                conditions.append(f"{column_expression(column, 'TEXT')} = ?")
                params.append(wanted)
        if self.orientation is not None:
            conditions.append({"landscape": "width > height", "portrait": "height > width",
                               "square": "width = height"}[self.orientation])
        return (" AND ".join(f"({c})" for c in conditions) or "1"), params


def column_expression(column: str, kind: str) -> str:
    """The SQL of a column's value as TEXT or REAL: a store column, else the manifest column in `extra`. The
    JSON path is written into the SQL (column names hold no double quote; single quotes are doubled), the
    same text as in the expression indexes `MetadataStore.index_columns` makes, so SQLite uses them."""
    if column in COLUMNS:
        return f"CAST({COLUMNS[column]} AS {kind})"
    path = '$."' + column.replace("'", "''") + '"'
    return f"CAST(json_extract(extra, '{path}') AS {kind})"


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def parse_where(items: list[str]) -> dict[str, str | tuple[str | None, str | None]]:
    """`COLUMN=VALUE` (equality, as text) or `COLUMN=LO..HI` (a range; numeric when both ends are numbers;
    either end may be left out) -> Filters.where."""
    out: dict[str, str | tuple[str | None, str | None]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise ValueError(f"--where {item!r}: expected COLUMN=VALUE or COLUMN=LO..HI")
        operator, name = column.rstrip()[-1], column.rstrip()[:-1].strip()
        if operator in "<>!":  # `width>=500` would filter on a column named "width>", matching nothing
            ranges = {">": f"{name}={value.strip()}..", "<": f"{name}=..{value.strip()}"}
            raise ValueError(f"--where {item!r}: not a comparison otclip knows; a range is COLUMN=LO..HI, an end may be "
                             f"left out" + (f" ({ranges[operator]})" if operator in ranges else ""))
        if ".." in value:
            lo, _, hi = value.partition("..")
            out[column.strip()] = (lo or None, hi or None)
        else:
            out[column.strip()] = value
    return out


def parse_date(text: str, flag: str) -> float:
    """An ISO date or date-time (local time) -> Unix seconds; one line naming the flag when malformed. A date in the
    first days of year 1 has no local time (the offset would reach year 0): it is read as UTC there."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a date like 2024-06-30 or 2024-06-30T18:00") from None
    try:
        return when.timestamp()
    except (ValueError, OverflowError, OSError):  # only a naive time goes through the local time zone
        return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def filters_from_strings(under: str | None = None, glob: str | None = None, label: str | None = None,
                         where: list[str] | None = None, after: str | None = None, before: str | None = None,
                         orientation: str | None = None, min_width: int | None = None,
                         min_height: int | None = None) -> Filters:
    """Filters from what a user typed (the CLI's flags, the HTTP API's parameters, the app's fields), so the
    three read them the same way. Empty strings mean no constraint."""
    check_at_least("--min-width", min_width, 0)
    check_at_least("--min-height", min_height, 0)
    # no image is 2^31 pixels wide (PNG's limit): a larger bound means the same, and SQLite's integers end at 2^63
    min_width, min_height = (None if v is None else min(v, 2**31) for v in (min_width, min_height))
    return Filters(
        path_prefix=under or None, path_glob=glob or None, label=label or None,
        where=parse_where([w for w in where or [] if w]),
        taken_after=parse_date(after, "--after") if after else None,
        taken_before=parse_date(before, "--before") if before else None,
        orientation=orientation or None, min_width=min_width, min_height=min_height)

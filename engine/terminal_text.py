"""Text from files and folders printed one item per line: a name or caption may hold a newline (a filename
may hold any byte but `/`), or a terminal's escape sequences."""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """`text` with each control character written as its escape (`\\n`, `\\t`, `\\x1b`, `\\x85`), as Python's
    repr would, and the backslash left alone: a result stays one line of the table, and a name cannot move the
    cursor, recolour the terminal or retitle its window."""
    if text.isprintable():
        return text
    return "".join(_NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)

"""Queries that combine texts and images, with weights and exclusions: `"a beach" + ./ref.jpg - people`,
`2:cat + dog`, `./pool.jpg + night`.

Grammar: terms joined by ` + ` or ` - ` (the sign needs a space on each side, so `t-shirt` stays one word);
a term is `[WEIGHT:]` then a quoted text, an image path, or plain words. An unquoted term is an image when
it ends with an image extension (no spaces) or starts with `./`, `../`, `/` or `~/`; such a path must exist.
A quoted term is always text. The query vector is

    q = normalise( sum_i  s_i * w_i * normalise(e_i) )

with e_i the model's embedding of term i, s_i = -1 after ` - ` (else +1) and w_i > 0 its weight (default 1):
every term counts by its weight whatever the length of its embedding, and scores stay cosines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from .image_paths import is_image_path

if TYPE_CHECKING:  # numpy is imported by `combine` only: parsing stays light for the terminal's fast path
    import numpy as np

_SPLIT = re.compile(r'(?<=\s)([+-])(?=\s)(?=(?:[^"]*"[^"]*")*[^"]*$)')  # a sign between spaces, outside quotes
_WEIGHT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+):(?!//)(.+)$")


class QueryError(ValueError):
    """A malformed query; str() quotes the query and says what is wrong."""


@dataclass(frozen=True)
class Term:
    kind: str  # "text" | "image"
    value: object  # the text; an image's path (or, from an upload, its bytes or decoded image)
    weight: float = 1.0  # signed: negative for an excluded term


def parse_query(query: str, allowed_image: Callable[[str], bool] | None = None) -> list[Term]:
    """The terms of a query string (see the module docstring); QueryError for a malformed one.
    `allowed_image`: which image paths a term may name (a server: the indexed ones), checked instead of
    the file system, so that a query can neither open nor probe any other file."""
    if not query or not query.strip():
        raise QueryError("empty query: type some words to search for, or give an image")
    if query.count('"') % 2:
        raise QueryError(f"query {query!r}: a quote is not closed")
    parts = _SPLIT.split(" " + query.strip() + " ")
    terms = []
    for i in range(0, len(parts), 2):
        sign = -1.0 if i and parts[i - 1] == "-" else 1.0
        raw = parts[i].strip()
        if not raw:
            if i == 0 and len(parts) > 1 and parts[1] == "-":
                continue  # a query may start with an exclusion: "- people + beach"
            raise QueryError(f"query {query!r}: a {parts[i - 1] if i else parts[1]!r} with no term beside it")
        terms.append(_term(raw, sign, query, allowed_image))
    if all(t.weight < 0 for t in terms):
        raise QueryError(f"query {query!r}: only exclusions; say what to look for too")
    return terms


def _term(raw: str, sign: float, query: str, allowed_image: Callable[[str], bool] | None) -> Term:
    weight = 1.0
    match = _WEIGHT.match(raw)
    if match:
        weight = float(match.group(1))
        raw = match.group(2).strip()
        if weight <= 0:
            raise QueryError(f"query {query!r}: weight {match.group(1)} must be positive (use ' - ' to exclude)")
    quoted = len(raw) >= 2 and raw[0] == raw[-1] == '"'
    value = raw[1:-1].strip() if quoted else raw
    if not value:
        raise QueryError(f"query {query!r}: an empty quoted term")
    if not quoted and _looks_like_path(value):
        refuse_url(value, f"query {query!r}")
        if allowed_image is not None:
            if not allowed_image(value):
                raise QueryError(f"query {query!r}: image {value!r} is not in the index (give the full path of "
                                 "an indexed image, or upload one)")
            return Term("image", value, sign * weight)
        path = Path(value).expanduser()
        if not path.is_file():
            raise QueryError(f"query {query!r}: image {value!r}: no such file")
        return Term("image", str(path.resolve()), sign * weight)
    return Term("text", value, sign * weight)


def format_query(terms: Sequence[Term]) -> str | None:
    """A query string that parses back to exactly these terms (texts quoted, images as their paths), so a
    parsed query can be sent on (`otclip search` asking a running server); None when the terms cannot be
    written as one (an uploaded image, a path holding ' + ' or ' - ')."""
    parts = []
    for term in terms:
        if not isinstance(term.value, str):
            return None
        size = abs(term.weight)
        weight = "" if size == 1 else format(Decimal(repr(size)).normalize(), "f") + ":"
        value = f'"{term.value}"' if term.kind == "text" else term.value
        sign = ("- " if term.weight < 0 else "") if not parts else (" - " if term.weight < 0 else " + ")
        parts.append(sign + weight + value)
    query = "".join(parts)
    try:
        same = parse_query(query, allowed_image=lambda path: True) == list(terms)
    except QueryError:
        return None
    return query if same else None


_URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def refuse_url(value: str, where: str) -> None:
    """QueryError if an image given `where` (the query, --image) is a URL: otclip reads images from files and never
    fetches (a path is what the index and a query both keep)."""
    if _URL.match(value):
        raise QueryError(f"{where}: image {value!r} is a URL: otclip reads images from files; download it and give "
                         "its path")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~/")) or (is_image_path(value) and " " not in value)


def combine(terms: Sequence[Term], encode_texts: Callable[[list], np.ndarray],
            encode_images: Callable[[list], np.ndarray]) -> np.ndarray:
    """The (d,) query vector of the terms: the normalised weighted sum of their normalised embeddings."""
    import numpy as np

    for t in terms:  # a weight the query language cannot write: an API's image_weight (NaN gave no results, silently)
        if not (math.isfinite(t.weight) and t.weight != 0):
            raise QueryError(f"weight {t.weight}: a term's weight is a non-zero number (negative excludes)")

    texts = [t for t in terms if t.kind == "text"]
    images = [t for t in terms if t.kind == "image"]
    parts = []
    if texts:
        parts.append((encode_texts([t.value for t in texts]), texts))
    if images:
        parts.append((encode_images([t.value for t in images]), images))
    total = None
    for vectors, group in parts:
        vectors = np.asarray(vectors, np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        weighted = (np.array([t.weight for t in group])[:, None] * vectors).sum(axis=0)
        total = weighted if total is None else total + weighted
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the terms cancel out: nothing is left to search for")
    return (total / norm).astype(np.float32)

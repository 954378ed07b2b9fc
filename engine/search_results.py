"""What a search returns, as plain data: the searcher builds it, the CLI prints it, the HTTP API sends it as
JSON and `otclip search` reads it back from a running server (without importing numpy or FAISS)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class SearchResult:
    rank: int
    score: float
    id: int
    path: str | None = None  # images
    sha256: str | None = None  # the content's digest (names its thumbnail)
    text: str | None = None  # texts, or an image's caption
    label: str | None = None
    width: int | None = None
    height: int | None = None
    duplicates: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    taken: float | None = None  # images: EXIF DateTimeOriginal, else the file's mtime (Unix seconds)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != [] and v != {}}


@dataclass
class SearchPage:
    """One page of results; `more`: whether the next page (offset + k) holds any."""

    results: list[SearchResult]
    offset: int
    more: bool

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "offset": self.offset,
                "next_offset": self.offset + len(self.results) if self.more else None}

    @classmethod
    def from_dict(cls, body: dict) -> SearchPage:
        """The page `to_dict` wrote (keys a result does not have, such as the API's links, are left out)."""
        names = {f.name for f in fields(SearchResult)}
        results = [SearchResult(**{k: v for k, v in r.items() if k in names}) for r in body["results"]]
        return cls(results, body["offset"], body.get("next_offset") is not None)

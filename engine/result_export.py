"""A result list written out: as CSV or JSON text, or its images linked (or copied) into a folder."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .search_results import SearchResult

CSV_FIELDS = ("rank", "score", "path", "text", "label", "width", "height", "taken", "id", "duplicates")


def results_csv(results: Sequence[SearchResult]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({**r.__dict__, "duplicates": ";".join(r.duplicates)})
    return out.getvalue()


def results_json(results: Sequence[SearchResult]) -> str:
    return json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2)


def export_images(results: Sequence[SearchResult], folder: str | Path, copy: bool = False) -> int:
    """Link (or copy) each result's image into `folder` as RANK-NAME (the rank keeps the order in a file
    browser), beside results.csv. A file of the same name from an earlier export is replaced. Returns how
    many images were exported (a result whose file is gone is left out)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--export {folder}: is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    exported = 0
    for r in results:
        if not r.path or not os.path.isfile(r.path):
            continue
        target = folder / f"{r.rank:04d}-{Path(r.path).name}"
        target.unlink(missing_ok=True)
        if copy:
            shutil.copy2(r.path, target)
        else:
            target.symlink_to(os.path.abspath(r.path))
        exported += 1
    (folder / "results.csv").write_text(results_csv(results), encoding="utf-8")
    return exported

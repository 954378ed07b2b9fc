"""What the first index of a model costs before any image is embedded: importing torch and open_clip, building
the model, and exporting and checking its two query towers (what makes every later query and re-index of that
model torch-free). One fresh process, the phases in the order `otclip index` runs them; after each, the wall
time, the resident memory and the process's peak so far (the peak is what `/usr/bin/time` and
`rclip_side_by_side.py` report for a whole run).

  python benchmarks/first_use.py [--model ViT-B-32-256]
Writes benchmarks/results/first_use-MODEL.json. Run it alone: any other busy process changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32-256", help="an open_clip architecture (seeded random weights)")
    args = ap.parse_args()

    rows: list[dict] = []
    start = time.perf_counter()

    def phase(name: str, fn):
        t = time.perf_counter()
        out = fn()
        rows.append({"phase": name, "seconds": time.perf_counter() - t, "rss_mb": _rss_mb(), "peak_mb": _peak_mb()})
        return out

    with tempfile.TemporaryDirectory(prefix="otclip-first-use-") as tmp:
        os.environ["OTCLIP_CACHE_DIR"] = tmp  # nothing exported before: a model new to the machine
        phase("import torch", lambda: __import__("torch"))
        phase("import open_clip", lambda: __import__("open_clip"))
        from otclip.engine import load_model
        from otclip.engine.image_query_export import export_image_query_model
        from otclip.engine.index_directory import IndexDirectory
        from otclip.engine.text_query_export import export_text_query_model

        loaded = phase("build the model, its checksum", lambda: load_model(args.model, device="cpu"))
        directory = IndexDirectory(Path(tmp) / "index")
        directory.open_for_model(args.model, loaded.identity, loaded.embed_dim)
        for tower, export in (("text", export_text_query_model), ("image", export_image_query_model)):
            refused = phase(f"export and check the {tower} tower", lambda export=export: export(loaded, directory))
            if refused:
                raise SystemExit(f"{args.model}: the {tower} tower was not exported: {refused}")
    total = time.perf_counter() - start

    print(f"first use of {args.model}, before any image is embedded (one process)")
    print(f"{'phase':<34}{'seconds':>9}{'RSS MB':>9}{'peak MB':>9}")
    for r in rows:
        print(f"{r['phase']:<34}{r['seconds']:>9.1f}{r['rss_mb']:>9.0f}{r['peak_mb']:>9.0f}")
    print(f"{'total':<34}{total:>9.1f}")
    out = Path(__file__).parent / "results" / f"first_use-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "phases": rows, "seconds": total}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

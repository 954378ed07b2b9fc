"""otclip and rclip (the terminal photo-search peer, PyPI `rclip`, ONNX Runtime) side by side on the same
JPEGs, the same architecture (ViT-B-32-256, rclip's) and the same weights: otclip's seed-0 random weights
for that architecture, exported here into rclip's model folder in rclip's own format (visual.onnx and
textual.onnx taking `input`, open_clip's BPE vocabulary), since rclip's real weights are a download away
and this machine has no network. Checked before timing: rclip's text and image vectors equal otclip's.

Timed, each in a fresh process, medians of --runs (wall time, peak RSS): full indexing of the folder
(rclip: its first query there, which indexes first; otclip: of a model new to the machine, its query
towers exported in the run, and of a model seen before, whose checked exports and identity the cache
keeps, as rclip keeps its model files: that run encodes through ONNX Runtime, no torch), cold text and
image queries (rclip: `--no-indexing`), a no-op re-index of the unchanged folder (rclip: a query, which
checks the folder first), and otclip's query with an `otclip serve` of the index up.
Writes benchmarks/results/rclip_side_by_side.json.

  python -m venv /tmp/rclip-venv && /tmp/rclip-venv/bin/pip install rclip==3.3.0
  python benchmarks/rclip_side_by_side.py --rclip /tmp/rclip-venv/bin/rclip [--images 400] [--runs 5]
Run it alone: any other busy process changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from cli_speed import serving, timed

ARCH = "ViT-B-32-256"
RCLIP_MODEL = "ViT-B-32-256-datacomp_s34b_b86k"  # the folder rclip 3.3 reads its ONNX files from


def jpeg_folder(n: int, folder: Path) -> Path:
    """n JPEGs of 640 to 2000 px on the longer side: the bundled sample photos, resized and rotated."""
    from PIL import Image

    from otclip.engine.sample_photos import SAMPLE_PHOTOS, sample_photo

    folder.mkdir(parents=True)
    photos = [sample_photo(p.name) for p in SAMPLE_PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % len(photos)].rotate(7 * (i // len(photos)), expand=True)
        side = int(rng.integers(640, 2001))
        img = img.resize((side, max(1, round(side * img.height / img.width))), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def export_for_rclip(datadir: Path, rclip_python: str) -> None:
    """otclip's ARCH weights as rclip's model files; then checks that rclip computes otclip's vectors."""
    import open_clip
    import torch

    from otclip.engine import Encoder, load_model

    loaded = load_model(ARCH)
    model = loaded.model.eval()
    target = datadir / RCLIP_MODEL
    target.mkdir(parents=True, exist_ok=True)
    (datadir / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", datadir / "tokenizer")

    class Tower(torch.nn.Module):
        def __init__(self, encode) -> None:
            super().__init__()
            self.model, self.encode = model, encode

        def forward(self, x):
            return getattr(self.model, self.encode)(x)

    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    with torch.no_grad():
        for name, encode, example in (("textual.onnx", "encode_text", loaded.tokenizer(["a cat"])),
                                      ("visual.onnx", "encode_image", torch.zeros(1, 3, 256, 256))):
            torch.onnx.export(Tower(encode), (example,), str(target / name), input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
                              dynamo=False)
    check = ("import sys, json\nfrom PIL import Image\nfrom rclip.model import Model\nm = Model()\n"
             "print(json.dumps([m.compute_text_features(['a cat', 'a rocket']).tolist(),"
             " m.compute_image_features([Image.open(sys.argv[1])]).tolist()]))")
    from otclip.engine.sample_photos import write_sample_photos

    photo = write_sample_photos(datadir / "probe")[0]
    theirs = json.loads(subprocess.run([rclip_python, "-c", check, str(photo)], capture_output=True, text=True,
                                       check=True, env=rclip_env(datadir)).stdout)
    ours = Encoder(loaded)
    text_gap = np.abs(np.array(theirs[0]) - ours.encode_texts(["a cat", "a rocket"])).max()
    image_cos = float(np.array(theirs[1][0]) @ ours.encode_images([photo])[0])
    print(f"rclip vs otclip, same weights: text vectors differ by {text_gap:.1e}; image cosine {image_cos:.4f} "
          "(rclip resizes with PIL, no JPEG draft decoding)")
    if text_gap > 1e-4 or image_cos < 0.99:
        raise SystemExit("rclip does not compute otclip's vectors: the export is wrong")


def rclip_env(datadir: Path) -> dict:
    return {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}


def median_run(cmd: list[str], runs: int, cwd: Path | None = None, env: dict | None = None) -> dict:
    return summary([timed(cmd, env, cwd) for _ in range(runs)])


def summary(results: list[tuple[float, float]]) -> dict:
    return {"seconds_median": float(np.median([r[0] for r in results])), "seconds_all": [r[0] for r in results],
            "peak_rss_mb": float(np.median([r[1] for r in results]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rclip", type=Path, required=True, help="rclip's executable, in its own environment")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--index-runs", type=int, default=1, help="full indexing runs of each tool (minutes each)")
    ap.add_argument("--export-to", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_to:
        return export_for_rclip(args.export_to, str(args.rclip.parent / "python"))
    otclip = [sys.executable, "-m", "otclip"]
    report: dict = {"images": args.images, "arch": ARCH, "cores": len(os.sched_getaffinity(0)), "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="otclip-vs-rclip-") as tmp:
        tmp = Path(tmp)
        folder = jpeg_folder(args.images, tmp / "photos")
        models = tmp / "rclip-models"
        # in a child: this process stays small (a child forked from it counts its pages in its peak RSS)
        subprocess.run([sys.executable, __file__, "--rclip", str(args.rclip), "--export-to", str(models)], check=True)

        def fresh_rclip_datadir(i: int) -> dict:
            datadir = tmp / f"rclip-data-{i}"
            shutil.copytree(models, datadir)  # the models only: no index yet
            return rclip_env(datadir)

        rows = {}
        full = [timed([str(args.rclip), "-f", "a cat"], fresh_rclip_datadir(i), folder) for i in range(args.index_runs)]
        rows["full indexing", "rclip"] = summary(full)
        for cached in (False, True):  # a model new to the machine, or seen before (exports and identity cached)
            full = []
            for i in range(args.index_runs):
                cache = tmp / f"otclip-cache-{0 if cached else i}"  # cached: the first run's
                shutil.rmtree(tmp / "ix", ignore_errors=True)
                full.append(timed([*otclip, "index", str(folder), "--out", str(tmp / "ix"), "--model", ARCH,
                                   "--no-progress"], {**os.environ, "OTCLIP_CACHE_DIR": str(cache)}))
            rows[f"full indexing{', model seen before' if cached else ''}", "otclip"] = summary(full)
        env = rclip_env(tmp / f"rclip-data-{args.index_runs - 1}")
        rows["cold text query", "rclip"] = median_run([str(args.rclip), "-n", "-f", "a cat"], args.runs, folder, env)
        rows["cold text query", "otclip"] = median_run([*otclip, "search", str(tmp / "ix"), "a cat"], args.runs)
        photo = str(next(folder.glob("*.jpg")))
        rows["cold image query", "rclip"] = median_run([str(args.rclip), "-n", "-f", photo], args.runs, folder, env)
        rows["cold image query", "otclip"] = median_run([*otclip, "search", str(tmp / "ix"), "--image", photo], args.runs)
        rows["no-op re-index (rclip: + a query)", "rclip"] = median_run([str(args.rclip), "-f", "a cat"], args.runs,
                                                                        folder, env)
        rows["no-op re-index (rclip: + a query)", "otclip"] = median_run(
            [*otclip, "index", str(folder), "--out", str(tmp / "ix"), "--model", ARCH, "--no-progress"], args.runs)
        with serving(tmp / "ix"):
            rows["text query, `otclip serve` up", "otclip"] = median_run([*otclip, "search", str(tmp / "ix"), "a cat"],
                                                                         args.runs)
    print(f"{args.images} JPEGs, {ARCH} (same weights), medians: seconds (peak MB)")
    print(f"{'':<38}{'rclip':>16}{'otclip':>16}{'otclip / rclip':>16}")
    for what in dict.fromkeys(w for w, _ in rows):
        cells = [rows.get((what.split(",")[0] if what.startswith("full indexing") else what, "rclip")),
                 rows.get((what, "otclip"))]
        text = [f"{c['seconds_median']:.2f} ({c['peak_rss_mb']:.0f})" if c else "-" for c in cells]
        ratio = f"{cells[1]['seconds_median'] / cells[0]['seconds_median']:.2f}" if all(cells) else ""
        print(f"{what:<38}{text[0]:>16}{text[1]:>16}{ratio:>16}")
    report["rows"] = {f"{what} | {tool}": r for (what, tool), r in rows.items()}
    out = Path(__file__).parent / "results" / "rclip_side_by_side.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

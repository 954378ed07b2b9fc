"""Encoding throughput: the full pipeline (files -> decode in workers -> model) against the model's
forward pass alone on pre-decoded tensors, in the same run. Goal: ratio >= 0.9 (decoding is not
the bottleneck). Texts/s likewise. Prints a table; writes benchmarks/results/encode_throughput-DEVICE.json.

  python benchmarks/encode_throughput.py [--model effnet-minilm] [--images 256] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from otclip.engine import Encoder, load_model
from otclip.engine.devices import autocast_for
from otclip.engine.images import load_image
from otclip.engine.sample_photos import SAMPLE_PHOTOS, write_sample_photos


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="effnet-minilm")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--texts", type=int, default=2048)
    args = ap.parse_args()

    loaded = load_model(args.model)
    encoder = Encoder(loaded, batch_size=args.batch_size, num_workers=args.workers)
    photos = write_sample_photos(Path(tempfile.gettempdir()) / "otclip-bench-photos")
    files = [photos[i % len(photos)] for i in range(args.images)]
    tensors = torch.stack([loaded.preprocess(load_image(p, draft=loaded.image_size)) for p in files])

    @torch.no_grad()
    def forward_only():
        for start in range(0, len(tensors), args.batch_size):
            with autocast_for(encoder.device):
                loaded.model.encode_image(tensors[start : start + args.batch_size].to(encoder.device))

    forward_only()  # warm-up (CUDA kernels, allocator, oneDNN primitives)
    encoder.encode_images(files[: args.batch_size])
    t_forward = timed(forward_only)
    t_pipeline = timed(lambda: encoder.encode_images(files, progress=False))
    texts = [SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)].caption + f" {i}" for i in range(args.texts)]
    encoder.encode_texts(texts[:256])
    t_texts = timed(lambda: encoder.encode_texts(texts, progress=False))

    row = {
        "model": args.model,
        "device": str(encoder.device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "cpu_threads": torch.get_num_threads(),
        "decode_workers": encoder.num_workers,
        "batch_size": args.batch_size,
        "images": args.images,
        "forward_only_images_per_s": args.images / t_forward,
        "pipeline_images_per_s": args.images / t_pipeline,
        "pipeline_over_forward": t_forward / t_pipeline,
        "texts_per_s": args.texts / t_texts,
        "host": platform.node(),
    }
    print(f"{'model':<16}{'device':<28}{'forward img/s':>14}{'pipeline img/s':>16}{'ratio':>8}{'texts/s':>10}")
    print(f"{row['model']:<16}{row['device'][:27]:<28}{row['forward_only_images_per_s']:>14.1f}"
          f"{row['pipeline_images_per_s']:>16.1f}{row['pipeline_over_forward']:>8.2f}{row['texts_per_s']:>10.1f}")
    out = Path(__file__).parent / "results" / f"encode_throughput-{encoder.device.type}-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

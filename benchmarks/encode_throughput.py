"""Encoding throughput: the full pipeline (files -> decode in workers -> model) against the model's
forward pass alone on pre-decoded tensors, in the same run. Goal: ratio >= 0.9 (decoding is not
the bottleneck). JPEGs decoded in the workers (PIL, draft mode) or on the model's device (nvJPEG on a
GPU; torchvision's libjpeg in the main process on a CPU), with and without the display copies indexing
makes, at the sample photos' size (~500 px) and larger (--scale). Texts/s likewise. Prints a table;
writes benchmarks/results/encode_throughput-DEVICE-MODEL.json.

  python benchmarks/encode_throughput.py [--model effnet-minilm] [--images 256] [--batch-size 64] [--scale 1 4]
      [--decode cpu cpu-workers device device-all] [--thumbnails 0 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from otclip.engine import Encoder, device_decoding, load_model
from otclip.engine.image_batches import default_num_workers
from otclip.engine.images import load_image
from otclip.engine.sample_photos import SAMPLE_PHOTOS, write_sample_photos


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


PHONE_SIDE = 4032  # a 12-megapixel phone photo's longer side


def photo_files(scale: float) -> list[Path]:
    """The sample photos as JPEGs (quality 92), `scale` times their size (camera photos are several times larger),
    at most PHONE_SIDE on the longer side."""
    from PIL import Image

    photos = write_sample_photos(Path(tempfile.gettempdir()) / "otclip-bench-photos")
    if scale == 1:
        return photos
    folder = Path(tempfile.gettempdir()) / f"otclip-bench-photos-x{scale:g}"
    folder.mkdir(exist_ok=True)
    out = []
    for p in photos:
        target = folder / p.name
        if not target.exists():
            image = Image.open(p)
            factor = min(scale, PHONE_SIDE / max(image.size))  # no larger than a phone camera's photo
            image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC).save(
                target, format="JPEG", quality=92)
        out.append(target)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="effnet-minilm")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="forward and pipeline timed in turns this many times")
    ap.add_argument("--scale", type=float, nargs="+", default=[1.0],
                    help="photo sizes to run, as multiples of the sample photos' (~500 px)")
    ap.add_argument("--decode", nargs="+", choices=["cpu", "cpu-workers", "device", "device-all"],
                    default=["cpu", "device"],
                    help="where JPEGs are decoded: on the CPU by PIL as the Encoder chooses (worker processes beside a "
                         "GPU; on a CPU device, threads between forward passes), by PIL in worker processes (cores - "
                         "1) whatever the device, on the model's device (nvJPEG on a GPU) except large ones "
                         "(device_decoding.DRAFT_ON_CPU_FROM), or on the device whatever their size")
    ap.add_argument("--thumbnails", nargs="+", type=int, choices=[0, 1], default=[0, 1],
                    help="runs without (0) and with (1) the display copies that indexing makes")
    args = ap.parse_args()

    loaded = load_model(args.model)
    encoders = {mode: Encoder(loaded, batch_size=args.batch_size,
                              num_workers=default_num_workers() if mode == "cpu-workers" else args.workers,
                              device_decoding=mode.startswith("device")) for mode in args.decode}
    encoder = next(iter(encoders.values()))
    draft_on_cpu_from = device_decoding.DRAFT_ON_CPU_FROM
    rows = []
    for scale in args.scale:
        photos = photo_files(scale)
        files = [photos[i % len(photos)] for i in range(args.images)]
        tensors = torch.stack([loaded.preprocess(load_image(p, draft=loaded.image_size)) for p in files[: 4 * args.batch_size]])

        def forward_only(tensors=tensors):  # as many images as the pipeline's, cycling through 4 batches' worth
            for start in range(0, args.images, args.batch_size):
                begin = start % len(tensors)  # the model called as the pipeline calls it (`Encoder.forward`)
                encoder.forward(loaded.model.encode_image, tensors[begin : begin + args.batch_size])

        forward_only()  # warm-up (CUDA kernels, allocator, oneDNN primitives)
        for mode, enc in encoders.items():
            # the decoding workers are forked per run and read the module's threshold then
            device_decoding.DRAFT_ON_CPU_FROM = math.inf if mode == "device-all" else draft_on_cpu_from
            for thumbnails in map(bool, args.thumbnails):
                def pipeline(enc=enc, files=files, thumbnails=thumbnails):
                    for _ in enc.iter_image_batches(files, progress=False, thumbnails=thumbnails):
                        pass

                list(enc.iter_image_batches(files[: args.batch_size], thumbnails=thumbnails))  # warm-up
                # forward and pipeline in turns, the ratio of each pair: a shared machine's speed drifts
                pairs = [(timed(forward_only), timed(pipeline)) for _ in range(args.repeats)]
                t_forward, t_pipeline = (float(np.median(t)) for t in zip(*pairs))
                rows.append({"scale": scale, "photo_pixels": int(np.mean([_pixels(p) for p in photos])),
                             "decode": mode, "thumbnails": thumbnails, "repeats": args.repeats,
                             "forward_only_images_per_s": args.images / t_forward,
                             "pipeline_images_per_s": args.images / t_pipeline,
                             "pipeline_over_forward": float(np.median([f / p for f, p in pairs])),
                             "pipeline_over_forward_each": [f / p for f, p in pairs]})
                print(_row_line(rows[-1]), flush=True)
    texts = [SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)].caption + f" {i}" for i in range(args.texts)]
    encoder.encode_texts(texts[:256])
    t_texts = timed(lambda: encoder.encode_texts(texts, progress=False))

    result = {
        "model": args.model,
        "device": str(encoder.device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "cpu_threads": torch.get_num_threads(),
        "decode_workers": encoder.num_workers,  # where used: worker processes (rows' decode "cpu" on a GPU, "cpu-workers")
        "batch_size": args.batch_size,
        "images": args.images,
        "rows": rows,
        "texts_per_s": args.texts / t_texts,
        "host": platform.node(),
    }
    print(f"{result['model']} on {result['device']}; batch {args.batch_size}; {args.images} images; "
          f"{encoder.num_workers} decoding workers; texts/s {result['texts_per_s']:.1f}")
    print(f"{'scale':>6}{'pixels':>10}{'decode':>11}{'thumbs':>8}{'forward img/s':>15}{'pipeline img/s':>16}{'ratio':>8}")
    for r in rows:
        print(_row_line(r))
    out = Path(__file__).parent / "results" / f"encode_throughput-{encoder.device.type}-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _row_line(r: dict) -> str:
    return (f"{r['scale']:>6g}{r['photo_pixels']:>10}{r['decode']:>11}{str(r['thumbnails']):>8}"
            f"{r['forward_only_images_per_s']:>15.1f}{r['pipeline_images_per_s']:>16.1f}{r['pipeline_over_forward']:>8.2f}")


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.width * image.height


if __name__ == "__main__":
    main()

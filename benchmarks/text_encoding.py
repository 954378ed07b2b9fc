"""Caption encoding speed, what `otclip index-texts` and text queries pay: texts/s through the torch model
(ids padded to the context length), through the index's ONNX text export padded the same way (how exports
made before trimming run), and through the export padded only to each batch's longest text with the corpus
batched by length (#14), in one run; one query's latency each way. The trimmed vectors are checked against
the padded ones (max abs difference printed; the run stops above 1e-4). Writes
benchmarks/results/text_encoding-MODEL.json.

  python benchmarks/text_encoding.py [--model effnet-minilm] [--texts 2048] [--batch-size 256] [--repeats 3]
Run it alone: any other busy process changes every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from otclip.engine.threads import apply_thread_budget, passive_waiting, thread_budget

passive_waiting()  # before torch is imported, as the commands do

from otclip.engine import Encoder, load_model  # noqa: E402
from otclip.engine.index_directory import IndexDirectory  # noqa: E402
from otclip.engine.sample_photos import SAMPLE_PHOTOS  # noqa: E402
from otclip.engine.text_query_export import export_text_query_model  # noqa: E402
from otclip.engine.text_query_model import TextQueryModel  # noqa: E402


def corpus(n: int, seed: int = 0) -> list[str]:
    """Captions of 1-4 of the sample photos' captions joined (about 5-60 words), each made distinct."""
    rng = random.Random(seed)
    captions = [p.caption for p in SAMPLE_PHOTOS]
    return [", ".join(rng.sample(captions, rng.randint(1, 4))) + f" ({i})" for i in range(n)]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="effnet-minilm")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    apply_thread_budget(thread_budget())
    loaded = load_model(args.model, device="cpu")
    texts = corpus(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        directory = IndexDirectory(Path(tmp) / "index")
        directory.open_for_model(args.model, loaded.identity, loaded.embed_dim)
        refused = export_text_query_model(loaded, directory)
        if refused:
            raise SystemExit(f"no text export for {args.model}: {refused}")
        files, info = directory.query_model_files("text")
        ways = {"torch (padded)": Encoder(loaded),
                "ONNX export, padded": TextQueryModel(files["text.onnx"], files["tokenizer.json"], {**info, "trim": False}),
                "ONNX export, trimmed": TextQueryModel(files["text.onnx"], files["tokenizer.json"], info)}
        rows, vectors = {}, {}
        for name, model in ways.items():
            model.encode_texts(texts[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm up
            seconds = best_of(args.repeats, lambda m=model, n=name: vectors.__setitem__(
                n, m.encode_texts(texts, batch_size=args.batch_size, progress=False)))
            model.encode_texts(["a cat"], progress=False)
            query = best_of(20, lambda m=model: m.encode_texts(["a photo of a cat"], progress=False))
            rows[name] = {"texts_per_s": len(texts) / seconds, "seconds": seconds, "query_ms": query * 1000}
    trimmed_error = float(np.abs(vectors["ONNX export, trimmed"] - vectors["ONNX export, padded"]).max())
    print(f"{args.model}: {len(texts)} captions ({np.mean([len(t.split()) for t in texts]):.0f} words on average), "
          f"batches of {args.batch_size}, best of {args.repeats}; trimmed export {'on' if info.get('trim') else 'off'}")
    print(f"{'':24}{'texts/s':>10}{'seconds':>10}{'query ms':>10}")
    for name, r in rows.items():
        print(f"{name:24}{r['texts_per_s']:>10.1f}{r['seconds']:>10.2f}{r['query_ms']:>10.2f}")
    print(f"trimmed vs padded vectors: max abs difference {trimmed_error:.1e}")
    if not trimmed_error <= 1e-4:
        raise SystemExit("the trimmed export's vectors differ from the padded ones")
    out = Path(__file__).parent / "results" / f"text_encoding-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "texts": len(texts), "batch_size": args.batch_size,
                               "repeats": args.repeats, "trim": bool(info.get("trim")), "rows": rows,
                               "trimmed_max_abs_difference": trimmed_error}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

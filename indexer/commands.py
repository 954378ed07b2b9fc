"""Indexer subcommands: index, index-texts, reindex, search, info."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from otclip.engine import DEFAULT_MODEL_NAME


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="index an image folder or manifest (incremental; torchrun-shardable)")
    p.add_argument("images", type=Path, help="folder of images, or a .csv/.jsonl/.parquet manifest with a path column")
    p.add_argument("--out", type=Path, required=True, help="index directory")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model spec (default: %(default)s)")
    p.add_argument("--factory", default="auto", help='FAISS factory string, e.g. "HNSW32", "IVF4096,PQ64" (default: auto)')
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: cores - 1)")
    p.add_argument("--chunk-size", type=int, default=1024, help="embeddings committed per chunk")
    p.add_argument("--no-thumbnails", action="store_true",
                   help="keep no JPEG display copies (the app then makes its result tiles from the originals)")
    _speed_flags(p)
    p.set_defaults(func=_index)

    p = sub.add_parser("index-texts", help="index a text corpus as the text side (for image -> text search)")
    p.add_argument("texts", type=Path, help=".txt (one per line) or .csv/.jsonl/.parquet with a text column")
    p.add_argument("--out", type=Path, required=True, help="index directory")
    p.add_argument("--model", default=None, help="model spec (default: the index's model, else effnet-minilm)")
    p.add_argument("--factory", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    _speed_flags(p)
    p.set_defaults(func=_index_texts)

    p = sub.add_parser("reindex", help="rebuild the FAISS indexes with another factory string, without re-encoding")
    p.add_argument("index_dir", type=Path)
    p.add_argument("--factory", required=True)
    p.set_defaults(func=_reindex)

    p = sub.add_parser("search", help="search an index by text or by image")
    p.add_argument("index_dir", type=Path)
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", type=Path, help="query by this image instead of text")
    p.add_argument("--target", choices=["images", "texts"], default="images", help="what to return")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--min-score", type=float, default=None)
    p.add_argument("--model", default=None, help="model spec (default: the one the index was built with)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: the available cores)")
    p.set_defaults(func=_search)

    p = sub.add_parser("check", help="check every file of an index directory; name each damaged one (exit 1 if any)")
    p.add_argument("index_dir", type=Path)
    p.set_defaults(func=_check)

    p = sub.add_parser("repair", help="rebuild a damaged manifest, metadata store or FAISS index from what survives")
    p.add_argument("index_dir", type=Path)
    p.add_argument("--factory", default=None, help="FAISS factory for rebuilt sides (default: the recorded one, else auto)")
    p.set_defaults(func=_repair)

    p = sub.add_parser("info", help="describe an index directory")
    p.add_argument("index_dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)


def _speed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the available cores)")
    p.add_argument("--no-text-export", action="store_true",
                   help="do not keep an ONNX export of the text tower (text queries in `otclip search` then load torch)")
    p.add_argument("--no-progress", action="store_true")


def _index(args: argparse.Namespace) -> int:
    from otclip.engine.threads import apply_thread_budget, thread_budget

    from .pipeline import index_images

    apply_thread_budget(thread_budget(args.threads))
    summary = index_images(args.images, args.out, args.model, args.factory, args.batch_size, args.workers,
                           args.chunk_size, progress=not args.no_progress, text_query_model=not args.no_text_export,
                           thumbnails=not args.no_thumbnails)
    print(summary.line())
    return 0


def _index_texts(args: argparse.Namespace) -> int:
    from otclip.engine.threads import apply_thread_budget, thread_budget

    from .pipeline import index_texts

    apply_thread_budget(thread_budget(args.threads))
    summary = index_texts(args.texts, args.out, args.model, args.factory, args.batch_size,
                          progress=not args.no_progress, text_query_model=not args.no_text_export)
    print(summary.line())
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from .pipeline import reindex

    for side in reindex(args.index_dir, args.factory):
        print(f"rebuilt: {side['items']} items, {side['vectors']} vectors, factory {side['factory']}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from otclip.engine.search import IndexSearcher

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image PATH")
    model = None
    if args.model:
        from otclip.engine import load_model

        model = load_model(args.model)
    # a text query is answered by the index's exported text tower when it keeps one: no torch, no model load
    searcher = IndexSearcher(args.index_dir, model=model, exported_text=args.image is None, threads=args.threads,
                             few_queries=True)
    if args.image is not None:
        results = searcher.search_image_batch([args.image], args.k, args.min_score, target=args.target)[0]
    else:
        results = searcher.search_text_batch([args.query], args.k, args.min_score, target=args.target)[0]
    if args.json:
        print(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2))
        return 0
    if not results:
        print("no results" + (f" above score {args.min_score}" if args.min_score is not None else ""))
    for r in results:
        what = r.path if args.target == "images" else r.text
        caption = f"  ({r.text})" if args.target == "images" and r.text else ""
        print(f"{r.rank:>4}  {r.score:6.3f}  {what}{caption}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.index_repair import find_problems

    directory = IndexDirectory(args.index_dir)
    problems = find_problems(directory)
    for problem in problems:
        print(problem.line())
    if not problems:
        print(f"{directory.root}: every file checked is whole (manifest, metadata store, records, embedding chunks, "
              "FAISS indexes, text-tower export)")
        return 0
    print(f"{len(problems)} problem(s); searching may still work, nothing was changed")
    return 1


def _repair(args: argparse.Namespace) -> int:
    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.index_repair import find_problems, repair

    directory = IndexDirectory(args.index_dir)
    for line in repair(directory, args.factory):
        print(line)
    left = find_problems(directory)
    print(f"{directory.root}: " + ("whole" if not left else f"{len(left)} problem(s) left (`otclip check` lists them)"))
    return 0 if not left else 1


def _info(args: argparse.Namespace) -> int:
    import datetime

    from otclip.engine.search import IndexSearcher

    info = IndexSearcher(args.index_dir).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = sys.stdout
    print(f"index     {info['index_dir']}", file=out)
    print(f"model     {info['model']['name']} (spec {info['model']['spec']}, weights {info['model']['checksum'][:12]})")
    print(f"dim       {info['dim']} ({info['metric']})")
    for side, s in info["sides"].items():
        when = datetime.datetime.fromtimestamp(s["updated"]).isoformat(timespec="seconds")
        print(f"{side:<9} {s['items']} items, {s['vectors']} vectors, {s['factory']} ({s['index_type']}), updated {when}")
    print(f"size      {info['size_bytes'] / 1e6:.1f} MB on disk")
    return 0

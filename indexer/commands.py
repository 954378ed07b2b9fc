"""Indexer subcommands: index, index-texts, reindex, search, info."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from otclip.engine import DEFAULT_MODEL_NAME
from otclip.engine.flag_values import check_at_least

if TYPE_CHECKING:
    from otclip.engine.exclusions import Exclusions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="index an image folder or manifest (incremental; torchrun-shardable)")
    p.add_argument("images", type=Path, help="folder of images, or a .csv/.jsonl/.parquet manifest with a path column")
    p.add_argument("--out", type=Path, required=True, help="index directory")
    p.add_argument("--model", default=None, help=f"model spec (default: the index's model, else {DEFAULT_MODEL_NAME})")
    _factory_flags(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding workers: processes for the torch model, threads beside an exported tower (default: "
                        "cores - 1; the torch model on a CPU decodes in threads between forward passes)")
    p.add_argument("--chunk-size", type=int, default=1024, help="embeddings committed per chunk")
    p.add_argument("--no-thumbnails", action="store_true",
                   help="keep no JPEG display copies (the app then makes its result tiles from the originals)")
    p.add_argument("--replace", action="store_true",
                   help="index another folder or manifest than the one the index mirrors in its place (a library "
                   "moved elsewhere); without it a run that would take photos out so is refused")
    _exclusion_flags(p)
    _speed_flags(p)
    p.set_defaults(func=_index)

    p = sub.add_parser("watch", help="index a folder, then again whenever its photos change (until Ctrl-C)")
    p.add_argument("images", type=Path, help="folder of images")
    p.add_argument("--out", type=Path, required=True, help="index directory")
    p.add_argument("--model", default=None, help=f"model spec (default: the index's model, else {DEFAULT_MODEL_NAME})")
    _factory_flags(p)
    p.add_argument("--settle", type=float, default=2.0, help="seconds without changes before re-indexing")
    p.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                   help="list the folder for changes every SECONDS rather than wait for the system's events, which a "
                   "network share does not raise for another machine's changes (default: 30 on NFS, SMB, SSHFS and "
                   "the like, else 0: events)")
    p.add_argument("--no-thumbnails", action="store_true")
    _exclusion_flags(p)
    _speed_flags(p)
    p.set_defaults(func=_watch)

    p = sub.add_parser("index-texts", help="index a text corpus as the text side (for image -> text search)")
    p.add_argument("texts", type=Path, help=".txt (one per line) or .csv/.jsonl/.parquet with a text column")
    p.add_argument("--out", type=Path, required=True, help="index directory")
    p.add_argument("--model", default=None, help=f"model spec (default: the index's model, else {DEFAULT_MODEL_NAME})")
    _factory_flags(p)
    p.add_argument("--batch-size", type=int, default=256)
    _speed_flags(p)
    p.set_defaults(func=_index_texts)

    p = sub.add_parser("reindex", help="rebuild the FAISS indexes with another factory string or memory budget, "
                       "without re-encoding")
    p.add_argument("index_dir", type=Path)
    _factory_flags(p)
    p.set_defaults(func=_reindex)

    p = sub.add_parser("search", help="search an index by texts and images, with filters and pages")
    p.add_argument("index_dir", type=Path)
    p.add_argument("query", nargs="?", help='texts and images with weights and exclusions: "a beach" + ./ref.jpg - '
                   "people, 2:cat + dog (see README)")
    p.add_argument("--image", help="add this image file to the query (or query by it alone)")
    p.add_argument("--target", choices=["images", "texts"], default="images", help="what to return")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--offset", type=int, default=0, help="skip the first N results (the next page)")
    p.add_argument("--min-score", type=float, default=None)
    p.add_argument("--order", choices=["score", "date"], default="score",
                   help="date: the best 1000 (above --min-score) sorted newest first")
    p.add_argument("--collapse", type=float, default=None, metavar="COSINE",
                   help="leave out results at least this similar to a better one (near-duplicates), e.g. 0.95")
    filters = p.add_argument_group("filters (all must hold)")
    filters.add_argument("--under", metavar="FOLDER", help="images below this folder")
    filters.add_argument("--glob", help="a shell pattern over the whole path, e.g. '*/2024/*.jpg'")
    filters.add_argument("--label")
    filters.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE|COLUMN=LO..HI",
                         help="a manifest column (or width, height, size, caption) equal to VALUE or in a range; repeatable")
    filters.add_argument("--after", metavar="DATE", help="taken on or after (EXIF DateTimeOriginal, else mtime), e.g. 2024-06-01")
    filters.add_argument("--before", metavar="DATE", help="taken before")
    filters.add_argument("--orientation", choices=["landscape", "portrait", "square"])
    filters.add_argument("--min-width", type=int)
    filters.add_argument("--min-height", type=int)
    p.add_argument("--model", default=None, help="model spec (default: the one the index was built with)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--csv", action="store_true", help="print results as CSV")
    p.add_argument("--export", type=Path, metavar="FOLDER", help="link the result images into FOLDER (with results.csv)")
    p.add_argument("--copy", action="store_true", help="with --export: copy the images instead of linking them")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: the available cores)")
    p.add_argument("--local", action="store_true", help="search in this process even when an `otclip serve` of "
                   "the index is running (by default such a server answers: no index or model to load)")
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
    p.add_argument("--recall", type=int, default=0, metavar="N",
                   help="also measure recall@10 against exact search on N stored vectors (each held out)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)


def _factory_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factory", default="auto", help='FAISS factory string, e.g. "HNSW32", "IVF4096,PQ64" (default: '
                   "auto: exact, IVF-Flat, then IVF-SQ8 as the collection grows)")
    p.add_argument("--max-index-memory", type=_user_value(parse_size), default=None, metavar="SIZE",
                   help="with --factory auto: the most accurate index that fits, e.g. 4G (kept with the index for "
                   "later runs; 0 removes it)")


def _exclusion_flags(p: argparse.ArgumentParser) -> None:
    from otclip.engine.exclusions import DEFAULT_EXCLUDES

    given = p.add_mutually_exclusive_group()
    given.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                       help="leave out folders and files matching this shell pattern: a name anywhere ('Screenshots', "
                       "'*.tmp.jpg') or, with a '/', a path below the folder ('2019/private'); repeatable; kept with the "
                       "index for later runs, which a new --exclude replaces. Always left out: "
                       f"{', '.join(DEFAULT_EXCLUDES)}, and names starting with a dot")
    given.add_argument("--no-exclude", action="store_true", help="forget the --exclude patterns the index keeps")
    p.add_argument("--include-hidden", action=argparse.BooleanOptionalAction, default=None,
                   help="index folders and files whose names start with a dot too (kept with the index; default: as "
                   "kept, else no)")


def _exclusions(args: argparse.Namespace) -> Exclusions | None:
    """The exclusions the flags give, each one not given as the index keeps it; None if none is given (the index's
    own, said in one line on stderr when there are any)."""
    from otclip.engine.exclusions import Exclusions
    from otclip.engine.index_directory import IndexDirectory

    kept = IndexDirectory(args.out).kept_exclusions()
    if not (args.exclude or args.no_exclude or args.include_hidden is not None):
        if kept != Exclusions() and args.images.is_dir():
            print(f"otclip: as kept with {args.out}: {kept.flags()} (a new --exclude replaces the patterns, "
                  "--no-exclude forgets them)", file=sys.stderr, flush=True)
        return None
    patterns = kept.patterns if not (args.exclude or args.no_exclude) else tuple(args.exclude)
    return Exclusions(patterns, kept.include_hidden if args.include_hidden is None else args.include_hidden)


def _user_value(parse):
    """An argparse type from a parser that raises ValueError with a one-line message (argparse prints it)."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def parse_size(text: str) -> int:
    """'4G', '500M', '2.5GB', '1e9' -> bytes (powers of 1000; '0': no budget); one line naming the text otherwise."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    cleaned = text.strip().upper().removesuffix("B")
    scale = units.get(cleaned[-1:], 1)
    try:
        size = float(cleaned[:-1] if scale > 1 else cleaned) * scale
        if not math.isfinite(size):  # "inf" and "nan" parse as floats: int() of them was a traceback
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"--max-index-memory {text!r}: expected a size like 4G, 500M or 2.5GB") from None
    if size < 0:
        raise ValueError(f"--max-index-memory {text!r}: a size cannot be negative")
    return int(size)


def _speed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="model threads (default: the available cores)")
    p.add_argument("--no-query-export", "--no-text-export", action="store_true",
                   help="do not keep ONNX exports of the text and image towers, nor encode through a cached one: "
                        "indexing and `otclip search` then use torch")
    p.add_argument("--no-progress", action="store_true")


def _index(args: argparse.Namespace) -> int:
    from otclip.engine.threads import apply_thread_budget, thread_budget

    from .pipeline import index_images

    apply_thread_budget(thread_budget(args.threads))
    summary = index_images(args.images, args.out, args.model, args.factory, args.batch_size, args.workers,
                           args.chunk_size, progress=not args.no_progress, query_models=not args.no_query_export,
                           thumbnails=not args.no_thumbnails, max_index_memory=args.max_index_memory,
                           exclusions=_exclusions(args), replace=args.replace)
    print(summary.line())
    return 0


def _watch(args: argparse.Namespace) -> int:
    from otclip.engine.threads import apply_thread_budget, thread_budget

    from .watch import watch

    apply_thread_budget(thread_budget(args.threads))
    watch(args.images, args.out, args.model, settle=args.settle, poll=args.poll, factory=args.factory,
          max_index_memory=args.max_index_memory, progress=not args.no_progress,
          query_models=not args.no_query_export, thumbnails=not args.no_thumbnails, exclusions=_exclusions(args))
    return 0


def _index_texts(args: argparse.Namespace) -> int:
    from otclip.engine.threads import apply_thread_budget, thread_budget

    from .pipeline import index_texts

    apply_thread_budget(thread_budget(args.threads))
    summary = index_texts(args.texts, args.out, args.model, args.factory, args.batch_size,
                          progress=not args.no_progress, query_models=not args.no_query_export,
                          max_index_memory=args.max_index_memory)
    print(summary.line())
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from .pipeline import reindex

    for side in reindex(args.index_dir, args.factory, args.max_index_memory):
        print(f"rebuilt: {side['items']} items, {side['vectors']} vectors, factory {side['factory']}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from otclip.engine.filters import filters_from_strings
    from otclip.engine.query_language import Term, parse_query, refuse_url
    from otclip.engine.result_export import export_images, results_csv, results_json
    from otclip.engine.terminal_text import one_line
    from otclip.engine.threads import thread_budget

    terms = parse_query(args.query) if args.query is not None else []
    if args.image is not None:
        refuse_url(args.image, "--image")
        terms.append(Term("image", str(Path(args.image).expanduser().resolve())))
    if not terms:
        raise ValueError('give a query (e.g. "a beach" + ./ref.jpg - people) or --image PATH')
    filters = filters_from_strings(args.under, args.glob, args.label, args.where, args.after, args.before,
                                   args.orientation, args.min_width, args.min_height)
    thread_budget(args.threads)  # a bad --threads is refused whichever process answers
    page = None if args.model or args.local else _ask_running_server(args, terms, filters.path_prefix)
    if page is None:
        page = _search_here(args, terms, filters)
    results = page.results
    if args.export is not None:
        exported = export_images(results, args.export, copy=args.copy)
        print(f"exported {exported} of {len(results)} results to {args.export}", file=sys.stderr)
    if args.json:
        print(results_json(results))
        return 0
    if args.csv:
        print(results_csv(results), end="")
        return 0
    if not results:
        print("no results" + (f" above score {args.min_score}" if args.min_score is not None else "")
              + (" passing the filters" if not filters.is_empty() else ""))
    for r in results:  # one line each, whatever a name or caption holds
        what = r.path if args.target == "images" else r.text
        caption = f"  ({one_line(r.text)})" if args.target == "images" and r.text else ""
        print(f"{r.rank:>4}  {r.score:6.3f}  {one_line(what)}{caption}")
    if page.more:
        print(f"more: --offset {args.offset + len(results)}", file=sys.stderr)
    return 0


def _ask_running_server(args: argparse.Namespace, terms: list, under: str | None):
    """The page a running `otclip serve` of this index gives (same query, filters and page), or None."""
    from otclip.engine.query_language import format_query
    from otclip.engine.remote_search import search_remote
    from otclip.engine.running_servers import server_for

    server = server_for(args.index_dir)
    query = format_query(terms) if server is not None else None
    if query is None:
        return None
    return search_remote(server, {
        "q": query, "target": args.target, "k": args.k, "offset": args.offset, "min_score": args.min_score,
        "order": args.order, "collapse": args.collapse, "under": under, "glob": args.glob, "label": args.label,
        "where": args.where, "after": args.after, "before": args.before, "orientation": args.orientation,
        "min_width": args.min_width, "min_height": args.min_height})


def _search_here(args: argparse.Namespace, terms: list, filters):
    from otclip.engine.search import IndexSearcher

    model = None
    if args.model:
        from otclip.engine import load_model

        model = load_model(args.model)
    # text and image terms are answered by the index's exported towers when it keeps them: no torch, no model load
    searcher = IndexSearcher(args.index_dir, model=model, exported=True, threads=args.threads, few_queries=True)
    return searcher.search(terms, args.target, args.k, args.offset, args.min_score, filters, args.order, args.collapse)


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

    from otclip.engine.exclusions import Exclusions
    from otclip.engine.faiss_indexes import size_text
    from otclip.engine.index_directory import RETIRED_DAYS
    from otclip.engine.search import IndexSearcher

    check_at_least("--recall", args.recall, 0)
    searcher = IndexSearcher(args.index_dir)
    info = searcher.info()
    if args.recall > 0:
        for side, s in info["sides"].items():
            s["recall@10"], s["recall_queries"] = searcher.recall(side, args.recall), min(args.recall, s["vectors"])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = sys.stdout
    print(f"index     {info['index_dir']}", file=out)
    print(f"model     {info['model']['name']} (spec {info['model']['spec']}, weights {info['model']['checksum'][:12]})")
    print(f"dim       {info['dim']} ({info['metric']})")
    if info["source"]:
        print(f"source    {info['source']} (the images mirror it)")
    for side, s in info["sides"].items():
        when = datetime.datetime.fromtimestamp(s["updated"]).isoformat(timespec="seconds")
        merged = " on disk" if s.get("lists_on_disk") else ""
        built = f", added by {s['ranks']} torchrun ranks and merged{merged}" if s.get("ranks", 1) > 1 else ""
        print(f"{side:<9} {s['items']} items, {s['vectors']} vectors, {s['factory']} ({s['index_type']}), updated "
              f"{when}{built}")
        kind = "exact vectors" if s["exact"] else "codes re-ranked from .vectors.npy" if s["reranked"] else "codes"
        kind += ", lists memory-mapped from .ivfdata" if s.get("lists_on_disk") else ""
        recall = f", recall@10 {s['recall@10']:.3f} ({s.get('recall_queries')} held-out queries)" if "recall@10" in s else ""
        print(f"{'':<9} index {size_text(s['index_bytes'])} ({kind}){recall}")
        if s["retired"]:
            print(f"{'':<9} {s['retired']} removed image content(s) keep their embedding and thumbnail for "
                  f"{RETIRED_DAYS} days after removal (a file that comes back is not embedded again)")
    if info["max_index_memory"]:
        print(f"budget    --max-index-memory {size_text(info['max_index_memory'])} (auto keeps within it)")
    kept = Exclusions.from_entry(info["exclusions"])
    if kept != Exclusions():
        print(f"excludes  {kept.flags()} (kept for the runs over the folder)")
    print(f"size      {size_text(info['size_bytes'])} on disk")
    return 0

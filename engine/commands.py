"""Engine subcommands: `otclip rank`, a text -> image ranking over a folder or the sample gallery."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .flag_values import check_at_least
from .model_identity import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="rank images for text queries with a model (no index needed)")
    p.add_argument("queries", nargs="+", help="text queries")
    p.add_argument("--images", type=Path, help="folder of images (default: the bundled sample photos)")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model spec (default: %(default)s)")
    p.add_argument("-k", type=int, default=3, help="results per query (default: %(default)s)")
    p.set_defaults(func=run_rank)


def run_rank(args: argparse.Namespace) -> int:
    import tempfile

    from .encoding import Encoder
    from .image_folders import image_files
    from .model_loading import load_model
    from .sample_photos import write_sample_photos
    from .terminal_text import one_line

    check_at_least("-k", args.k)
    if not all(query.strip() for query in args.queries):
        raise ValueError("empty query: type some words to rank the images by")
    if args.images is None:
        paths = write_sample_photos(Path(tempfile.gettempdir()) / "otclip-sample-photos")
    else:
        if not args.images.is_dir():
            raise FileNotFoundError(f"{args.images}: not a folder")
        paths = [Path(p) for p in image_files(args.images)]  # listed as `otclip index` lists them
        if not paths:
            raise FileNotFoundError(f"{args.images}: no images in it or its subfolders")
    encoder = Encoder(load_model(args.model))
    paths, images = _readable(encoder, paths, args.images or paths[0].parent)
    for query, q in zip(args.queries, encoder.encode_texts(args.queries)):
        scores = images @ q
        print(f"{query!r}:")
        for rank, i in enumerate(scores.argsort()[::-1][: args.k], start=1):
            print(f"  {rank}. {scores[i]:.3f}  {one_line(paths[i].name)}")
    return 0


def _readable(encoder, paths: list[Path], folder: Path) -> tuple[list[Path], np.ndarray]:
    """The images that decode and their embeddings; those that do not are skipped and named in one line on stderr,
    as `otclip index` skips them (one empty or damaged file had refused the whole folder)."""
    from .image_batches import skipped_images

    readable = encoder.encode_readable_images(paths)
    if readable.failures:
        print(f"otclip rank: {skipped_images(readable.failures, paths)}", file=sys.stderr)
    if not readable.indices:
        raise ValueError(f"{folder}: none of its {len(paths)} images can be read")
    return [paths[i] for i in readable.indices], readable.embeddings

"""`otclip data fashion-mnist`: a real partially-paired corpus from Debian's dataset-fashion-mnist.

Train: a random `pair_fraction` of the training images keep a caption (pairs); the other images
lose theirs and the captions of those images become unpaired texts, each list shuffled on its own,
so the partners exist but their correspondence is unknown. Captions come from several paraphrase
templates per class. The test split holds seen and unseen classes (generalized zero-shot).

Two protocols for the unseen classes:
- classic (default): they appear in no training or validation row.
- open world (`open_world=True`): they have no pairs, but the unpaired images and texts cover every
  class (a shop has captions for its old categories; new ones have photos and descriptions, unpaired).
Validation pairs are of seen classes in both. A pair fraction of 0 gives unpaired data alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from otclip.engine import fashion_mnist
from otclip.engine.atomic_files import write_lines_atomically
from otclip.engine.flag_values import check_at_least
from otclip.engine.prompts import class_prompt

TEMPLATES = (
    "a photo of {}.",
    "{} on a white background.",
    "a product photo of {}.",
    "a picture of {}, seen from the front.",
    "an item of clothing: {}.",
    "this is {}.",
)


def caption(label: int, rng: random.Random) -> str:
    return class_prompt(fashion_mnist.SHORT_NAMES[label], rng.choice(TEMPLATES))


def parse_unseen(names: str) -> set[int]:
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    lookup = {name.lower(): i for i, name in enumerate(fashion_mnist.SHORT_NAMES)}
    bad = [n for n in wanted if n not in lookup]
    if bad:
        raise ValueError(f"--unseen {bad}: unknown classes; choose from {', '.join(fashion_mnist.SHORT_NAMES)}")
    return {lookup[n] for n in wanted}


def build_fashion_mnist_corpus(out: str | Path, pair_fraction: float = 0.05, unseen: str = "", seed: int = 0,
                               train_size: int = 10_000, val_size: int = 1_000, test_size: int = 2_000,
                               open_world: bool = False, pool_seed: int | None = None, reuse: bool = False) -> dict:
    """Write PNGs and train/val/test manifests under `out`; returns counts per split and the parameters
    (`corpus.json`). `pair_fraction` is the share of the training images (seen classes) that keep their
    caption. `pool_seed` (default: `seed`) draws which images make up the splits, `seed` the pairs, captions
    and shuffles, so experiments can vary the pairing over one set of images. `reuse`: a corpus already under
    `out` built with these very parameters is kept as it is (experiments share their corpora); one built with
    others, or by a version that did not record them, is built again (its rows would change the figures)."""
    if not 0 <= pair_fraction <= 1:
        raise ValueError(f"--pair-fraction {pair_fraction}: must be in [0, 1]")
    for flag, size in (("--train-size", train_size), ("--val-size", val_size), ("--test-size", test_size)):
        check_at_least(flag, size, 0)  # a negative size would slice from the end: every image but that many
    out = Path(out)
    pool_seed = seed if pool_seed is None else pool_seed
    unseen_ids = parse_unseen(unseen)
    params = {"pair_fraction": pair_fraction, "seed": seed, "pool_seed": pool_seed, "open_world": open_world,
              "unseen": sorted(fashion_mnist.SHORT_NAMES[i] for i in unseen_ids), "train_size": train_size,
              "val_size": val_size, "test_size": test_size}
    if reuse and (kept := _kept_corpus(out)) and {k: kept.get(k) for k in params} == params:
        return kept
    pool_rng, rng = random.Random(pool_seed), random.Random(seed)
    train_x, train_y = fashion_mnist.load_split("train")
    test_x, test_y = fashion_mnist.load_split("test")
    seen_idx = [i for i in range(len(train_y)) if int(train_y[i]) not in unseen_ids]
    pool_rng.shuffle(seen_idx)
    val_idx = seen_idx[:val_size]
    if open_world:
        taken = set(val_idx)
        pool = [i for i in range(len(train_y)) if i not in taken]
        pool_rng.shuffle(pool)
        train_idx = pool[:train_size]
    else:
        train_idx = seen_idx[val_size : val_size + train_size]
    test_idx = list(range(len(test_y)))
    pool_rng.shuffle(test_idx)
    test_idx = sorted(test_idx[:test_size])

    def save(split: str, x, i: int) -> str:
        rel = Path("images") / split / f"{i:05d}.png"
        path = out / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fashion_mnist.to_photo(x[i]).save(path)
        return str(rel)

    seen_train = [i for i in train_idx if int(train_y[i]) not in unseen_ids]
    rng.shuffle(seen_train)
    n_pairs = round(pair_fraction * len(seen_train))
    if pair_fraction and not n_pairs:
        n_pairs = 1
    paired = set(seen_train[:n_pairs])
    pairs, rest = seen_train[:n_pairs], [i for i in train_idx if i not in paired]
    rows = [{"image": save("train", train_x, i), "text": caption(int(train_y[i]), rng),
             "label": fashion_mnist.SHORT_NAMES[train_y[i]], "split": "train"} for i in pairs]
    images = [{"image": save("train", train_x, i), "label": fashion_mnist.SHORT_NAMES[train_y[i]], "split": "train"}
              for i in rest]
    texts = [{"text": caption(int(train_y[i]), rng), "label": fashion_mnist.SHORT_NAMES[train_y[i]], "split": "train"}
             for i in rest]
    rng.shuffle(images)
    rng.shuffle(texts)
    train = rows + images + texts
    val = [{"image": save("val", train_x, i), "text": caption(int(train_y[i]), rng),
            "label": fashion_mnist.SHORT_NAMES[train_y[i]], "split": "val"} for i in val_idx]
    test = [{"image": save("test", test_x, i), "text": caption(int(test_y[i]), rng),
             "label": fashion_mnist.SHORT_NAMES[test_y[i]], "split": "test"} for i in test_idx]
    for name, split_rows in (("train", train), ("val", val), ("test", test)):
        write_lines_atomically(out / f"{name}.jsonl", [json.dumps(r) for r in split_rows])
    info = {"pairs": len(rows), "unpaired_images": len(images), "unpaired_texts": len(texts), "val": len(val),
            "test": len(test), **params}
    write_lines_atomically(out / "corpus.json", [json.dumps(info, indent=2)])  # last: it vouches for the manifests
    return info


def _kept_corpus(out: Path) -> dict | None:
    """The recorded info of a complete corpus under `out` (`corpus.json` and its three manifests), else None."""
    try:
        kept = json.loads((out / "corpus.json").read_text())
    except (OSError, ValueError):
        return None
    complete = isinstance(kept, dict) and all((out / f"{name}.jsonl").is_file() for name in ("train", "val", "test"))
    return kept if complete else None

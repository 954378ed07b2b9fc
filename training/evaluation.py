"""`otclip eval`: retrieval recall both ways, ranks, and (generalized) zero-shot classification,
for any model the loader takes, on a corpus manifest of pairs, or against an indexer's index."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otclip.engine import Encoder, LoadedModel
from otclip.engine.images import ImageDecodeError, load_image
from otclip.engine.metrics import (
    first_relevant_rank,
    harmonic_mean,
    recall_at_k,
    recall_from_ranks,
    relevance_from_ids,
    zero_shot_accuracy,
)
from otclip.engine.prompts import class_prompt

from .corpus import load_corpus

KS = (1, 5, 10)
INDEX_DEPTH = 100  # results a caption's first search through an index asks for (`ranks_through_index`)
RESULT_CELLS = 1_000_000  # queries x depth per search of `ranks_through_index`: memory stays bounded


@dataclass
class EvalData:
    """Unique images and texts of a test corpus, with the ids that decide relevance."""

    images: list[str]
    texts: list[str]
    image_labels: list[str | None]
    text_labels: list[str | None]
    relevant: np.ndarray  # (n_texts, n_images) bool: text j describes image i


def eval_data(manifest: str | Path, relevance: str = "pair") -> EvalData:
    corpus = load_corpus(manifest, require_pairs=True)
    images = sorted({r.image for r in corpus.pairs})
    texts = sorted({r.text for r in corpus.pairs})
    img_at, txt_at = {p: i for i, p in enumerate(images)}, {t: j for j, t in enumerate(texts)}
    img_label: dict[str, str | None] = {}
    txt_label: dict[str, str | None] = {}
    relevant = np.zeros((len(texts), len(images)), dtype=bool)
    for r in corpus.pairs:  # several captions per image and several images per caption are normal
        relevant[txt_at[r.text], img_at[r.image]] = True
        img_label[r.image], txt_label[r.text] = r.label, r.label
    il, tl = [img_label[p] for p in images], [txt_label[t] for t in texts]
    if relevance == "label":
        if any(x is None for x in il + tl):
            raise ValueError(f"{manifest}: --relevance label needs a label on every row")
        relevant = relevance_from_ids(tl, il)
    elif relevance != "pair":
        raise ValueError(f"--relevance {relevance!r}: expected 'pair' or 'label'")
    return EvalData(images, texts, il, tl, relevant)


def _unseen_from_corpus_info(manifest: Path) -> list[str] | None:
    info = manifest.parent / "corpus.json"
    return json.loads(info.read_text()).get("unseen") if info.exists() else None


def evaluate(loaded: LoadedModel, manifest: str | Path, relevance: str = "pair", unseen: list[str] | None = None,
             index_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """The report: {"model", "corpus", "text_to_image": {...}, "image_to_text": {...}, "zero_shot": {...}}, and
    "skipped" [{"path", "reason"}] where some of the corpus's images could not be read (the rest is evaluated)."""
    manifest = Path(manifest)
    data = eval_data(manifest, relevance)
    encoder = Encoder(loaded, batch_size=batch_size)
    searcher = None
    try:
        if index_dir is None:
            readable = encoder.encode_readable_images(data.images, progress=progress)
            images, failures = readable.embeddings, readable.failures
        else:
            from otclip.engine.search import IndexSearcher

            searcher = IndexSearcher(index_dir, model=loaded)
            failures = _unindexed(searcher, index_dir, data)
        data, skipped = _without_images(data, failures, manifest)
        texts = encoder.encode_texts(data.texts, progress=progress)
        report: dict = {"model": {"name": loaded.identity.name, "checksum": loaded.identity.checksum},
                        "corpus": str(manifest), "relevance": relevance,
                        "counts": {"images": len(data.images), "texts": len(data.texts)}}
        if skipped:
            report["skipped"] = skipped
        if searcher is None:
            scores = texts @ images.T
            report["text_to_image"] = recall_at_k(scores, data.relevant, KS)
            report["image_to_text"] = recall_at_k(scores.T, data.relevant.T, KS)
        else:  # the vectors the index searches (not embedded again), for zero-shot
            images = searcher.image_vectors(data.images)
            ranks = ranks_through_index(searcher, texts, data.images, data.relevant)
            report["text_to_image"] = {**recall_from_ranks(ranks, KS), "not_returned": int(np.isinf(ranks).sum())}
    finally:
        if searcher is not None:
            searcher.close()
    labels = data.image_labels
    if all(lbl is not None for lbl in labels):
        classes = sorted(set(labels) | set(unseen or []))
        prompts = encoder.encode_texts([class_prompt(c) for c in classes], progress=False)
        y = np.array([classes.index(lbl) for lbl in labels])
        zs = {"accuracy": zero_shot_accuracy(images, prompts, y), "classes": len(classes)}
        unseen = unseen if unseen is not None else _unseen_from_corpus_info(manifest)
        if unseen:
            predictions = np.argmax(images @ prompts.T, axis=1)
            is_unseen = np.array([lbl in unseen for lbl in labels])
            # None where the test set has no image of that part (not an accuracy of 0)
            seen_acc = float(np.mean(predictions[~is_unseen] == y[~is_unseen])) if (~is_unseen).any() else None
            unseen_acc = float(np.mean(predictions[is_unseen] == y[is_unseen])) if is_unseen.any() else None
            both = seen_acc is not None and unseen_acc is not None
            zs.update({"seen": seen_acc, "unseen": unseen_acc,
                       "harmonic_mean": harmonic_mean(seen_acc, unseen_acc) if both else None,
                       "unseen_classes": sorted(unseen)})
        report["zero_shot"] = zs
    return report


def _unindexed(searcher, index_dir, data: EvalData) -> list[tuple[int, str]]:
    """(position, reason) of the corpus images the index does not list because they cannot be read (the indexer
    skipped them too); one it does not list but that reads means another index: refused."""
    missing = [i for i, p in enumerate(data.images) if not searcher.lists_image(p)]
    unreadable: dict[int, str] = {}
    for i in missing:
        try:
            load_image(data.images[i])
        except ImageDecodeError as exc:
            unreadable[i] = exc.reason
    others = [data.images[i] for i in missing if i not in unreadable]
    if others:
        raise ValueError(f"{index_dir}: {len(others)} corpus images are not in the index (first: {others[0]})")
    return list(unreadable.items())


def _without_images(data: EvalData, failures: list[tuple[int, str]], manifest: Path) -> tuple[EvalData, list[dict]]:
    """The corpus without the images that could not be read, and without the texts left with no relevant image
    (they could only be misses): a damaged file is skipped and named, as indexing and training skip one."""
    if not failures:
        return data, []
    gone = {i for i, _ in failures}
    keep = np.array([i not in gone for i in range(len(data.images))])
    if not keep.any():
        raise ValueError(f"{manifest}: none of its {len(data.images)} images can be read "
                         f"(first: {data.images[failures[0][0]]}: {failures[0][1]})")
    answered = data.relevant[:, keep].any(axis=1)
    kept = EvalData([p for p, k in zip(data.images, keep) if k], [t for t, a in zip(data.texts, answered) if a],
                    [lbl for lbl, k in zip(data.image_labels, keep) if k],
                    [lbl for lbl, a in zip(data.text_labels, answered) if a], data.relevant[answered][:, keep])
    return kept, [{"path": data.images[i], "reason": reason} for i, reason in sorted(failures)]


def ranks_through_index(searcher, queries: np.ndarray, images: list[str], relevant: np.ndarray) -> np.ndarray:
    """(n_queries,) the rank of each query's first relevant image among `images`, in the order the index's search
    gives them (approximate where the index is); the index's other items are not ranked (nothing says whether
    they are relevant), so an index of the corpus alone and a larger one rank alike. Ties worst case, as
    `first_relevant_rank`.

    A query is searched INDEX_DEPTH deep, then 4x deeper while none of its relevant images came back and the
    search does not yet cover the index: every corpus image the index orders above the first relevant one comes
    back with it, so the rank is exact in the index's order (a fixed depth made an image found below it the
    worst rank). A relevant image an approximate index never returns (in lists it does not probe) ranks inf: a
    miss at every k, left out of the mean rank."""
    at = {p: i for i, p in enumerate(images)}
    scores = np.full(relevant.shape, -np.inf, np.float32)
    returned = np.zeros(relevant.shape, bool)
    total = searcher.count()
    pending, depth = np.arange(len(queries)), INDEX_DEPTH
    while True:
        step = max(1, RESULT_CELLS // depth)  # queries per search: results held at once stay bounded
        for start in range(0, len(pending), step):
            rows = pending[start : start + step]
            for j, results in zip(rows, searcher.search_vectors(queries[rows], "images", k=depth)):
                for r in results:
                    for path in (r.path, *r.duplicates):
                        if path in at:
                            scores[j, at[path]], returned[j, at[path]] = r.score, True
        found = (returned & relevant).any(axis=1)
        if depth >= total or found.all():
            break
        pending, depth = np.flatnonzero(~found), min(total, depth * 4)
    ranks = first_relevant_rank(scores, relevant)
    ranks[~found] = np.inf
    return ranks


def format_report(report: dict) -> str:
    """The report as Markdown tables (also what the terminal prints)."""
    lines = [f"model {report['model']['name']} on {report['corpus']} "
             f"({report['counts']['images']} images, {report['counts']['texts']} texts, relevance {report['relevance']})", "",
             "| direction | R@1 | R@5 | R@10 | mean rank | median rank |", "|---|---|---|---|---|---|"]
    for key in ("text_to_image", "image_to_text"):
        if key in report:
            r = report[key]
            lines.append(f"| {key.replace('_', ' ')} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | "
                         f"{r['mean_rank']:.1f} | {r['median_rank']:.1f} |")
    skipped = report.get("skipped")
    if skipped:
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        lines += ["", f"skipped {len(skipped)} image{'s' if len(skipped) > 1 else ''} that cannot be read: {skipped[0]['path']} "
                  f"({skipped[0]['reason']}){more}; texts left with no image are not ranked"]
    unreturned = report.get("text_to_image", {}).get("not_returned")
    if unreturned:
        lines += ["", f"{unreturned} of {report['counts']['texts']} texts: the index's search returned none of their "
                  "images (approximate search): a miss at every k, not in the mean rank"]
    zs = report.get("zero_shot")
    if zs and "unseen_classes" in zs:  # a seen / unseen split; "-" where the test set has no image of a part
        cells = " | ".join("-" if zs[key] is None else f"{zs[key]:.3f}" for key in ("seen", "unseen", "harmonic_mean"))
        lines += ["", "| zero-shot | accuracy | seen | unseen | harmonic mean |", "|---|---|---|---|---|",
                  f"| {zs['classes']} classes | {zs['accuracy']:.3f} | {cells} |"]
    elif zs:
        lines += ["", "| zero-shot | accuracy |", "|---|---|", f"| {zs['classes']} classes | {zs['accuracy']:.3f} |"]
    return "\n".join(lines)

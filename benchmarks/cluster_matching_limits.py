"""What limits `ot-cluster` when there are no pairs at all (the partial-pairs experiment's Fashion-MNIST open
world at pair fraction 0, the same corpora and seeds): the goal asks 10-class zero-shot accuracy >= 0.55, the
experiment measures 0.409 from the untrained 0.319.

Without pairs, `ot-cluster` must say which of the K text groups each of the K image clusters shows, from the
joint space (the cross cost) and the two modalities' layouts (fused Gromov-Wasserstein). This script uses the
labels, which training never sees, to measure each signal against the best the clusters allow:
- purity of the image clusters and of the text groups (k-means of the frozen features, as `ot-cluster` does);
- the ceiling: the share of images whose class is that of the group the label-optimal one-to-one map gives
  their cluster (the true map);
- `ot-cluster`'s own pseudo-pairs (POT's fused GW at structure 0, 0.5, 1): the share right;
- every one of the K! one-to-one maps scored by the fused objective of hard maps,
      (1 - s) sum_c a_c M_c,m(c) + s sum_{c,c'} a_c a_c' (C1_cc' - C2_m(c)m(c'))^2,
  exhaustively: the best map's share right, and the rank of the true map (1 = the objective prefers it);
- zero-shot votes: each image's nearest text group in the joint space, counted per cluster, the map that
  maximises the counts (Hungarian).
Prints a table and writes benchmarks/results/cluster_matching_limits.json. About 25 s a seed on 2 cores (66 s for 3).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy.optimize import linear_sum_assignment

from otclip.engine.atomic_files import write_json_atomically
from otclip.training.cluster_matching import ClusterProblem, cluster_matching, cluster_problem
from otclip.training.matching import PoolFeatures

RESULTS = Path(__file__).parent / "results" / "cluster_matching_limits.json"
STRUCTURES = (0.0, 0.25, 0.5, 0.75, 1.0)


def purity(labels: np.ndarray, groups: np.ndarray) -> float:
    """Share of items whose label is their group's most common one."""
    return sum(np.unique(labels[groups == g], return_counts=True)[1].max() for g in np.unique(groups)) / len(labels)


def map_share(overlap: np.ndarray, cluster_map: np.ndarray) -> float:
    """Share of the images whose cluster the map sends to a group of their class (overlap[c, g]: images of
    cluster c whose class is group g's)."""
    return float(overlap[np.arange(len(cluster_map)), cluster_map].sum() / overlap.sum())


def best_map(score: np.ndarray) -> np.ndarray:
    """The one-to-one cluster -> group map that maximises the summed score."""
    rows, cols = linear_sum_assignment(-score)
    return cols[np.argsort(rows)]


def fused_values(pb: ClusterProblem, maps: np.ndarray, structure: float) -> np.ndarray:
    """The fused objective of each hard map (rows of `maps`), in chunks."""
    k, (c1, c2), out = len(pb.a), pb.layouts, np.empty(len(maps))
    for s in range(0, len(maps), 200_000):
        m = maps[s : s + 200_000].astype(np.int64)
        linear = (pb.a * pb.cross[np.arange(k), m]).sum(1)
        quad = (pb.a[:, None] * pb.a[None, :] * (c1 - c2[m[:, :, None], m[:, None, :]]) ** 2).sum((1, 2))
        out[s : s + len(m)] = (1 - structure) * linear + structure * quad
    return out


def one_seed(work: Path, seed: int, maps: np.ndarray, loaded) -> dict:
    from partial_pairs import fashion_corpus  # the experiment's own corpora (this folder is on the path)

    from otclip.engine import fashion_mnist
    from otclip.training.config import TrainConfig
    from otclip.training.corpus import load_corpus
    from otclip.training.trainer import Trainer

    args = SimpleNamespace(work=str(work), unseen="sandal,bag,ankle boot", train=3000, val=500, test=2000)
    corpus = fashion_corpus(args, "open-world", 0.0, seed)
    k = len(fashion_mnist.SHORT_NAMES)
    cfg = TrainConfig(corpus=str(corpus), out=str(work / "limits-run"), reg="ot-cluster", steps=1, seed=seed,
                      save_checkpoints=False, eval_every=10**9, match_clusters=k)
    trainer = Trainer(cfg, progress=False, loaded=loaded)
    rows = load_corpus(corpus / "train.jsonl", require_pairs=False)
    image_labels = np.array([r.label for r in rows.images])
    text_labels = np.array([r.label for r in rows.texts])
    x, y = trainer.embed(trainer.unp_img, trainer.unp_txt)
    features = PoolFeatures(trainer.unp_img, trainer.unp_txt)
    pb = cluster_problem(x, y, features, k, seed)
    groups = pb.text_group.numpy()
    distinct_labels = np.array([text_labels[c[0]] for c in pb.copies])
    group_class = [max(set(distinct_labels[groups == g]), key=list(distinct_labels[groups == g]).count) for g in range(k)]
    clusters = pb.image_group.numpy()
    overlap = np.array([[np.sum((clusters == c) & (image_labels == group_class[g])) for g in range(k)] for c in range(k)])
    truth = best_map(overlap)
    out = {"seed": seed, "images": len(x), "distinct_texts": len(pb.copies),
           "image_purity": purity(image_labels, clusters), "text_purity": purity(distinct_labels, groups),
           "ceiling": map_share(overlap, truth)}
    for s in (0.0, 0.5, 1.0):
        m = cluster_matching(x, y, features, k, s, seed)
        out[f"ot_cluster_s{s}"] = float(np.mean(image_labels[m.images.numpy()] == text_labels[m.texts.numpy()]))
    true_row = np.all(maps == truth, axis=1)
    for s in STRUCTURES:
        values = fused_values(pb, maps, s)
        out[f"exhaustive_s{s}"] = map_share(overlap, maps[np.argmin(values)].astype(np.int64))
        out[f"truth_rank_s{s}"] = int((values < values[true_row][0]).sum()) + 1
    nearest = (x.double() @ pb.text_centroids().T).argmax(1).numpy()
    votes = np.zeros((k, k))
    np.add.at(votes, (clusters, nearest), 1)
    out["zero_shot_votes"] = map_share(overlap, best_map(votes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/otclip-partial-pairs"), help="the experiment's --work")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.time()
    maps = np.array(list(itertools.permutations(range(10))), dtype=np.int8)
    from otclip.engine import load_model

    loaded = load_model("effnet-minilm")  # once for every seed
    rows = [one_seed(args.work, seed, maps, loaded) for seed in args.seeds]
    keys = [k for k in rows[0] if k not in ("seed", "images", "distinct_texts")]
    print(f"{'seed':<24}" + "".join(f"{r['seed']:>8}" for r in rows) + f"{'mean':>8}")
    for key in keys:
        values = [r[key] for r in rows]
        fmt = "{:>8d}" if key.startswith("truth_rank") else "{:>8.3f}"
        mean = np.mean(values)
        print(f"{key:<24}" + "".join(fmt.format(v) for v in values) + (f"{mean:>8.0f}" if "rank" in key else f"{mean:>8.3f}"))
    print(f"{len(rows)} seeds, {len(maps):,} maps each, {time.time() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.out, {"rows": rows, "maps_scored": len(maps), "seconds": time.time() - t0})


if __name__ == "__main__":
    main()

"""The partial-pairs experiment: what do unpaired images and texts buy, through each regularizer?

Two settings, every method, several pair fractions and 3 seeds each:
1. Fashion-MNIST (real images, the default model's frozen features cached once): a fraction of
   training images keep their caption; the rest of the images and captions are unpaired, shuffled
   apart; unseen classes are held out of training (generalized zero-shot on test). Every trained
   run is evaluated again after WiSE-FT (alpha 0.5) towards the untrained weights.
2. The linear setup of multimodal contrastive learning with unpaired data (Nakada et al. 2023):
   x = U1 z + e1, x~ = U2 z + e2 (d1=40, d2=39, r=10, noise 0.3), 300 pairs, N unpaired,
   10k test pairs, top-1 matching accuracy. Unpaired data are pairs whose correspondence was
   removed; the harder variant gives only half of the unpaired images a partner among the texts.
alpha and eps are chosen on validation data (5% pairs / N=1000, seed 0), never on test.
Headline per method: the fraction of the paired-only -> oracle gap it closes.
Fashion-MNIST captions name a class, so by default its contrastive loss counts every pair of the
same class as a positive (`--positives label`); `--positives pair` is plain CLIP InfoNCE.

  python benchmarks/partial_pairs.py                      # full run (about 20 minutes on a 2-core CPU)
  python benchmarks/partial_pairs.py --quick              # smoke run for CI
  python benchmarks/partial_pairs.py --from-json R.json   # rebuild a saved run's report and plots
Writes benchmarks/results/partial_pairs.json, partial_pairs.md and partial_pairs-*.png
(`partial_pairs-pair-positives.*` with `--positives pair`, `partial_pairs-quick.*` with `--quick`).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from otclip.engine.atomic_files import write_json_atomically, write_lines_atomically

METHODS = ["paired-only", "ot-pairwise", "ot-loop", "ot-barycenter", "ot-match", "mmcl-pseudo"]
REG_OF = {"paired-only": "none"}
GRID = {"alpha": [0.1, 1.0], "ot_eps": [0.05, 0.1]}
WISE_ALPHA = 0.5  # WiSE-FT weight of the fine-tuned model: the paper's middle setting, not tuned here
RESULTS = Path(__file__).parent / "results"


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def mean_std_cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f} +- {std:.3f}"


# --- Fashion-MNIST ------------------------------------------------------------------------------
def fashion(args, log) -> dict:
    from otclip.engine import fashion_mnist, load_model
    from otclip.engine.prompts import class_prompt
    from otclip.training.corpus import load_corpus
    from otclip.training.fashion_corpus import build_fashion_mnist_corpus
    from otclip.training.trainer import TrainConfig, Trainer
    from otclip.training.wise_ft import interpolate_states

    if not fashion_mnist.available():
        return {"skipped": "Debian's dataset-fashion-mnist is not installed"}
    root = Path(args.work) / "fashion"
    loaded = load_model("effnet-minilm")
    pristine = copy.deepcopy(loaded.model.state_dict())

    def corpus(fraction: float, seed: int) -> Path:
        out = root / f"p{fraction}-s{seed}"
        if not (out / "train.jsonl").exists():
            build_fashion_mnist_corpus(out, fraction, args.unseen, seed, args.train, args.val, args.test)
        return out

    def run(method: str, fraction: float, seed: int, alpha: float, eps: float) -> dict:
        loaded.model.load_state_dict(pristine)
        c = corpus(1.0 if method == "oracle" else fraction, seed)
        reg = "none" if method in ("paired-only", "oracle", "zero-shot") else method
        cfg = TrainConfig(corpus=str(c), out=str(root / "runs" / f"{method}-{fraction}-{seed}"), reg=reg, alpha=alpha,
                          ot_eps=eps, steps=args.steps, eval_every=10**9, positives=args.positives,
                          save_checkpoints=False, seed=seed, batch_size=64, unpaired_batch_size=args.unpaired_batch,
                          match_every=max(1, args.steps // 3))
        trainer = Trainer(cfg, progress=False, loaded=loaded)
        if method != "zero-shot":  # zero-shot: the untrained default, evaluated as it loads
            trainer.train()
        val = trainer.validate()
        test_rows = load_corpus(c / "test.jsonl").pairs
        img, txt = trainer.inputs_for(test_rows)
        labels = [r.label for r in test_rows]

        def test_metrics(prefix: str = "") -> dict:
            out = trainer.retrieval_metrics(img, txt, labels, "test_", [r.text for r in test_rows], [r.image for r in test_rows])
            out.update(zero_shot(trainer, img, labels, args.unseen.split(",")))
            return {prefix + k: v for k, v in out.items()}

        test = test_metrics()
        if method != "zero-shot":  # the same run after WiSE-FT towards the untrained weights (alpha fixed a priori)
            loaded.model.load_state_dict(interpolate_states(pristine, loaded.model.state_dict(), WISE_ALPHA))
            test.update(test_metrics("wise_"))
        return {**val, **test}

    def zero_shot(trainer, img, labels, unseen):
        from otclip.engine.metrics import harmonic_mean

        classes = list(fashion_mnist.SHORT_NAMES)
        prompts = trainer.loaded.tokenizer([class_prompt(c) for c in classes])
        cache_txt = trainer.trainable.text_features(prompts.to(trainer.device))
        x, y = trainer.embed(img, cache_txt)
        pred = (x @ y.T).argmax(1).cpu().numpy()
        truth = np.array([classes.index(lbl) for lbl in labels])
        is_unseen = np.array([lbl in unseen for lbl in labels])
        seen = float(np.mean(pred[~is_unseen] == truth[~is_unseen]))
        uns = float(np.mean(pred[is_unseen] == truth[is_unseen]))
        return {"zs_seen": seen, "zs_unseen": uns, "zs_harmonic": harmonic_mean(seen, uns)}

    # choose alpha / eps per method on validation (5% pairs, seed 0)
    chosen, sensitivity = {}, {}
    for method in METHODS[1:]:
        scores = {}
        for alpha in GRID["alpha"]:
            for eps in GRID["ot_eps"] if method != "mmcl-pseudo" else GRID["ot_eps"][:1]:
                scores[(alpha, eps)] = run(method, args.fractions[len(args.fractions) // 2], 0, alpha, eps)["val_mean_recall"]
                log(f"fashion val {method} alpha={alpha} eps={eps}: {scores[(alpha, eps)]:.3f}")
        chosen[method] = max(scores, key=scores.get)
        sensitivity[method] = [{"alpha": a, "ot_eps": e, "val_mean_recall": v} for (a, e), v in scores.items()]
    rows = []
    zs = run("zero-shot", args.fractions[0], 0, 0.0, 0.05)
    rows.append({"method": "zero-shot", "fraction": None, "seed": 0, **zs})
    for seed in args.seeds:
        rows.append({"method": "oracle", "fraction": 1.0, "seed": seed, **run("oracle", 1.0, seed, 0.0, 0.05)})
        for fraction in args.fractions:
            for method in METHODS:
                alpha, eps = chosen.get(method, (0.0, 0.05))
                t = time.time()
                r = run(method, fraction, seed, alpha, eps)
                rows.append({"method": method, "fraction": fraction, "seed": seed, "alpha": alpha, "ot_eps": eps, **r})
                log(f"fashion {method} p={fraction} seed={seed}: test mean recall {r['test_mean_recall']:.3f} "
                    f"({time.time() - t:.0f}s)")
    return {"sizes": {"train": args.train, "val": args.val, "test": args.test}, "unseen": args.unseen,
            "positives": args.positives, "wise_alpha": WISE_ALPHA,
            "steps": args.steps, "chosen": {m: {"alpha": a, "ot_eps": e} for m, (a, e) in chosen.items()},
            "sensitivity": sensitivity, "runs": rows}


# --- the linear setup ---------------------------------------------------------------------------
def linear_data(n_pairs: int, n_unpaired: int, n_test: int, seed: int, half_partners: bool):
    """Pairs, unpaired (images, shuffled texts, and the texts' true partners for the oracle), test, val.
    Each part has its own generator, so the test set is the same whatever N is."""
    d1, d2, r, noise = 40, 39, 10, 0.3
    g = torch.Generator().manual_seed(seed)
    U1 = torch.linalg.qr(torch.randn(d1, r, generator=g))[0]
    U2 = torch.linalg.qr(torch.randn(d2, r, generator=g))[0]

    def sample(n, part):
        gp = torch.Generator().manual_seed(seed * 1000 + part)
        z = torch.randn(n, r, generator=gp)
        return z @ U1.T + noise * torch.randn(n, d1, generator=gp), z @ U2.T + noise * torch.randn(n, d2, generator=gp)

    px, py = sample(n_pairs, 1)
    ux, partners = sample(n_unpaired, 2)
    uy = partners.clone()
    if half_partners and n_unpaired:  # half of the texts come from other latents: no partner among the images
        uy[n_unpaired - n_unpaired // 2 :] = sample(n_unpaired // 2, 3)[1]
    has_partner = n_unpaired - n_unpaired // 2 if half_partners else n_unpaired
    uy = uy[torch.randperm(len(uy), generator=torch.Generator().manual_seed(seed * 1000 + 4))]
    tx, ty = sample(n_test, 5)
    vx, vy = sample(2000, 6)
    return {"pairs": (px, py), "unpaired": (ux, uy), "oracle_extra": (ux[:has_partner], partners[:has_partner]),
            "test": (tx, ty), "val": (vx, vy)}


def top1_matching(fx: torch.Tensor, fy: torch.Tensor) -> float:
    hits = 0
    for s in range(0, len(fx), 2000):
        hits += int(((fx[s : s + 2000] @ fy.T).argmax(1) == torch.arange(s, min(s + 2000, len(fx)))).sum())
    return hits / len(fx)


def linear_run(method: str, n_unpaired: int, seed: int, half: bool, alpha: float, eps: float, steps: int, n_test: int):
    from otclip.training.losses import StepEmbeddings, build_regularizer, clip_loss
    from otclip.training.matching import global_matching

    data = linear_data(300, n_unpaired, n_test, seed, half)
    (px, py), (ux, uy), (tx, ty), (vx, vy) = data["pairs"], data["unpaired"], data["test"], data["val"]
    if method == "oracle" and n_unpaired:  # every unpaired item with its true partner (where it has one)
        ox, oy = data["oracle_extra"]
        px, py = torch.cat([px, ox]), torch.cat([py, oy])
    torch.manual_seed(seed)
    f = torch.nn.Linear(40, 10, bias=False)
    h = torch.nn.Linear(39, 10, bias=False)
    scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    opt = torch.optim.Adam([*f.parameters(), *h.parameters(), scale], lr=1e-2)
    reg = None if method in ("paired-only", "oracle") or not n_unpaired else build_regularizer(method, eps=eps)
    gen = torch.Generator().manual_seed(seed)
    matching = None
    for step in range(steps):
        pi = torch.randint(0, len(px), (min(256, len(px)),), generator=gen)
        x, y = F.normalize(f(px[pi]), dim=1), F.normalize(h(py[pi]), dim=1)
        loss = clip_loss(x, y, scale)
        pseudo = method in ("mmcl-pseudo", "ot-match")  # pseudo-pairs only after a first stage on pairs
        if reg is not None and (not pseudo or step >= steps // 3):
            ui = torch.randint(0, len(ux), (256,), generator=gen)
            ti = torch.randint(0, len(uy), (256,), generator=gen)
            e = StepEmbeddings(x, y, F.normalize(f(ux[ui]), dim=1), F.normalize(h(uy[ti]), dim=1), scale)
            if method == "ot-match":
                if matching is None or step % 50 == 0:
                    with torch.no_grad():
                        matching = global_matching(F.normalize(f(ux), dim=1), F.normalize(h(uy), dim=1), eps=eps,
                                                   seed=seed + step)
                if len(matching.images) >= 2:
                    mi = torch.randint(0, len(matching.images), (256,), generator=gen)
                    e.match_images = F.normalize(f(ux[matching.images[mi]]), dim=1)
                    e.match_texts = F.normalize(h(uy[matching.texts[mi]]), dim=1)
                    e.match_weights = matching.weights[mi]
            loss = loss + alpha * sum(reg(e).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val = top1_matching(F.normalize(f(vx), dim=1), F.normalize(h(vy), dim=1))
        test = top1_matching(F.normalize(f(tx), dim=1), F.normalize(h(ty), dim=1))
    return {"val_top1": val, "test_top1": test}


def linear(args, log) -> dict:
    chosen = {}
    for method in METHODS[1:]:
        scores = {(a, e): linear_run(method, args.unpaired[1], 0, False, a, e, args.linear_steps, args.n_test)["val_top1"]
                  for a in GRID["alpha"] for e in GRID["ot_eps"]}
        chosen[method] = max(scores, key=scores.get)
        log(f"linear val {method}: chose alpha={chosen[method][0]} eps={chosen[method][1]}")
    rows = []
    for half in (False, True):
        for seed in args.seeds:
            for n in args.unpaired:
                for method in ["oracle", *METHODS]:
                    alpha, eps = chosen.get(method, (0.0, 0.05))
                    r = linear_run(method, n, seed, half, alpha, eps, args.linear_steps, args.n_test)
                    rows.append({"method": method, "unpaired": n, "seed": seed, "half_partners": half, **r})
            log(f"linear half={half} seed={seed} done")
    return {"chosen": {m: {"alpha": a, "ot_eps": e} for m, (a, e) in chosen.items()}, "runs": rows}


# --- report ---------------------------------------------------------------------------------------
def linear_top1(runs: list[dict], method: str, unpaired: int, half: bool) -> list[float]:
    return [r["test_top1"] for r in runs if r["method"] == method and r["unpaired"] == unpaired and r["half_partners"] == half]


def gap_closed(method: list[float], base: list[float], oracle: list[float]) -> float | None:
    """(method - paired-only) / (oracle - paired-only) on seed means; None where the oracle is not
    ahead of paired-only by more than the seeds' spread (the ratio would be noise over noise)."""
    gap = np.mean(oracle) - np.mean(base)
    if gap <= max(np.std(oracle), np.std(base), 1e-9):
        return None
    return float((np.mean(method) - np.mean(base)) / gap)


def gap_cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def summarise(results: dict) -> tuple[str, dict]:
    lines, headline = ["# Partial-pairs experiment", ""], {}
    fm = results.get("fashion", {})
    if "runs" in fm:
        s = fm["sizes"]
        positives = {"label": "every pair of the same class (captions name a class)",
                     "pair": "only the pair itself (plain CLIP InfoNCE: same-class captions are negatives)"}
        lines += [f"Fashion-MNIST: {s['train']} training images, {s['val']} validation, {s['test']} test; unseen "
                  f"classes {fm['unseen']}; {fm['steps']} steps per run; mean +- std over seeds. Recall uses label "
                  "relevance (a caption and an image of the same class match). Contrastive positives: "
                  f"{positives[fm.get('positives', 'pair')]}.", "",
                  "| method | pairs | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 | zs seen | zs unseen | zs H |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in fm["runs"]:
            groups.setdefault((r["method"], r["fraction"]), []).append(r)
        for (method, fraction), rs in groups.items():
            cells = [mean_std_cell([r[k] for r in rs])
                     for k in ("test_t2i_R@1", "test_t2i_R@5", "test_i2t_R@1", "test_i2t_R@5", "zs_seen", "zs_unseen",
                               "zs_harmonic")]
            lines.append(f"| {method} | {'-' if fraction is None else f'{fraction:.0%}'} | " + " | ".join(cells) + " |")
        if any("wise_zs_seen" in r for r in fm["runs"]):
            lines += ["", f"After WiSE-FT (alpha {fm.get('wise_alpha', WISE_ALPHA)}, towards the untrained weights; "
                      "`otclip wise-ft`), the same runs:", "",
                      "| method | pairs | test mean recall | zs seen | zs unseen | zs H | zs H before |",
                      "|---|---|---|---|---|---|---|"]
            for (method, fraction), rs in groups.items():
                if method == "zero-shot":
                    continue
                cells = [mean_std_cell([r[k] for r in rs])
                         for k in ("wise_test_mean_recall", "wise_zs_seen", "wise_zs_unseen", "wise_zs_harmonic",
                                   "zs_harmonic")]
                lines.append(f"| {method} | {f'{fraction:.0%}'} | " + " | ".join(cells) + " |")
        fractions = sorted({f for (_, f) in groups if f not in (None, 1.0)})
        measures = {"fashion": ("test_mean_recall", "test mean recall, the mean of R@1 and R@5 both ways"),
                    "fashion_zs_seen": ("zs_seen", "zero-shot accuracy on the seen classes' test images: steadier "
                                        f"than recall, whose {s['test']} text queries are class captions, "
                                        "a few dozen distinct ones")}
        for key, (metric, what) in measures.items():
            def values(method, fraction, metric=metric):
                return [r[metric] for r in groups[(method, fraction)]]

            headline[key] = {m: {f"{f:.0%}": gap_closed(values(m, f), values("paired-only", f), values("oracle", 1.0))
                                 for f in fractions} for m in METHODS[1:]}
            lines += ["", f"Fraction of the paired-only -> oracle gap closed ({what}):", "",
                      "| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
            lines += [f"| {m} | " + " | ".join(gap_cell(v) for v in by_fraction.values()) + " |"
                      for m, by_fraction in headline[key].items()]
    lin = results.get("linear", {})
    if "runs" in lin:
        lines += ["", "Linear setup (Nakada et al.): test top-1 matching accuracy, mean +- std over seeds.", ""]
        for half in (False, True):
            lines += [f"{'Half the unpaired images have a partner' if half else 'Every unpaired item has a partner'}:", "",
                      "| method | " + " | ".join(f"N={n}" for n in sorted({r['unpaired'] for r in lin['runs']})) + " |",
                      "|---|" + "---|" * len({r['unpaired'] for r in lin['runs']})]
            for method in ["oracle", *METHODS]:
                cells = []
                for n in sorted({r["unpaired"] for r in lin["runs"]}):
                    v = [r["test_top1"] for r in lin["runs"] if r["method"] == method and r["unpaired"] == n
                         and r["half_partners"] == half]
                    cells.append(mean_std_cell(v))
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
            n_max = max(r["unpaired"] for r in lin["runs"])
            top1 = {m: linear_top1(lin["runs"], m, n_max, half) for m in ["oracle", *METHODS]}
            headline.setdefault("linear_half" if half else "linear", {}).update(
                {m: gap_closed(top1[m], top1["paired-only"], top1["oracle"]) for m in METHODS[1:]})
    lines += ["", "Where a gap fraction is near 0 or negative, that method did not help there; n/a: the oracle is "
              "not ahead of paired-only by more than the seeds' spread, so no gap can be measured."]
    return "\n".join(lines), headline


def plots(results: dict, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fm = results.get("fashion", {})
    if "runs" in fm:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, method in enumerate(["paired-only", *METHODS[1:]]):
            rs = [r for r in fm["runs"] if r["method"] == method]
            fractions = sorted({r["fraction"] for r in rs})
            stats = [mean_std([r["test_mean_recall"] for r in rs if r["fraction"] == f]) for f in fractions]
            ax.errorbar([f * 100 * 1.04 ** (i - 2.5) for f in fractions], [m for m, _ in stats],  # spread apart
                        yerr=[sd for _, sd in stats], marker="o", capsize=2, label=method)
        oracle = np.mean([r["test_mean_recall"] for r in fm["runs"] if r["method"] == "oracle"])
        ax.axhline(oracle, color="k", linestyle="--", label="oracle (all pairs)")
        ax.set(xscale="log", xlabel="pairs (% of training images)", ylabel="test mean recall (+- std over seeds)",
               title="Fashion-MNIST")
        ax.legend(fontsize=7)
        path = RESULTS / f"{stem}-recall.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        out.append(str(path))
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
        for method, grid in fm["sensitivity"].items():
            for ax, key in zip(axes, ("alpha", "ot_eps")):
                xs = sorted({g[key] for g in grid})
                ax.plot(xs, [max(g["val_mean_recall"] for g in grid if g[key] == x) for x in xs], marker="o", label=method)
                ax.set(xscale="log", xlabel=key, ylabel="val mean recall (best over the other)")
        axes[0].legend(fontsize=7)
        path = RESULTS / f"{stem}-sensitivity.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        out.append(str(path))
    return out


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a CI-sized smoke run")
    ap.add_argument("--work", default="/tmp/otclip-partial-pairs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--positives", choices=["label", "pair"], default="label",
                    help="Fashion-MNIST contrastive positives (default: %(default)s)")
    ap.add_argument("--from-json", type=Path, default=None, help="rebuild the report and plots of a saved run")
    args = ap.parse_args()
    if args.from_json:
        RESULTS = args.out
        results = json.loads(args.from_json.read_text())
        write_report(results, args.from_json.stem)
        return
    args.unseen = "sandal,bag,ankle boot"
    if args.quick:
        args.train, args.val, args.test, args.steps, args.unpaired_batch = 200, 60, 100, 20, 64
        args.fractions, args.seeds, args.unpaired, args.linear_steps, args.n_test = [0.1], [0], [0, 200], 30, 1000
        GRID["alpha"], GRID["ot_eps"] = [0.5], [0.05]
    else:
        args.train, args.val, args.test, args.steps, args.unpaired_batch = 4000, 1000, 2000, 300, 256
        args.fractions, args.seeds, args.unpaired, args.linear_steps, args.n_test = [0.01, 0.05, 0.2], [0, 1, 2], \
            [0, 1000, 5000], 300, 10_000
    RESULTS = args.out
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    results = {"quick": args.quick, "linear": linear(args, log), "fashion": fashion(args, log)}
    results["seconds"] = time.time() - start
    stem = "partial_pairs" + ("-quick" if args.quick else "") + ("-pair-positives" if args.positives == "pair" else "")
    write_report(results, stem)


def write_report(results: dict, stem: str) -> None:
    """JSON, Markdown and plots under RESULTS/stem*."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    report, headline = summarise(results)
    results["headline_gap_closed"] = headline
    results["plots"] = [Path(path).name for path in plots(results, stem)]  # beside the JSON; the app shows them
    write_json_atomically(RESULTS / f"{stem}.json", results)
    write_lines_atomically(RESULTS / f"{stem}.md", [report, "", f"Total time {results['seconds'] / 60:.1f} min."])
    print(report)
    print(f"wrote {RESULTS / stem}.json and .md (run time {results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

"""Cost of each regularizer per training step (forward + backward) against the contrastive loss alone,
at batch 256 and 1024, d=384, and our Sinkhorn against POT's `ot.sinkhorn2` (torch backend, log domain)
in the same run, with the plan error against a converged POT plan. Goal: every regularizer at
batch 1024 costs at most 3x the contrastive loss. Also training steps/s with and without the
feature cache (cached: heads only; uncached: the frozen towers run every step), and those of the trainer's
own loop (`Trainer.train()`). `--data fashion-mnist` measures the same on the default model's embeddings of
real images and captions instead of synthetic clusters.
Writes benchmarks/results/ot_cost-DEVICE.json (ot_cost-DEVICE-fashion-mnist.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import ot
import torch
import torch.nn.functional as F

from otclip.training.losses import REGISTRY, StepEmbeddings, build_regularizer, clip_loss
from otclip.training.sinkhorn import cosine_cost, entropic_ot, uniform


def bench(fn, repeat: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat * 1000


def clustered(n: int, d: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, d, generator=g)
    x = centers[torch.randint(0, 10, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1).to(device)


def fashion_mnist_embeddings(n: int, device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The default model's embeddings of real data in the partially-paired setting the terms train in: n unpaired
    Fashion-MNIST test images, n unpaired captions (the experiment's templates, of other images' classes) and n // 4
    pairs of yet other images with a caption of their class, as (images, texts, anchor images, anchor texts). A check
    on the synthetic clusters, whose images and texts share no structure and whose anchors are unpaired rows."""
    from otclip.engine import Encoder, fashion_mnist, load_model
    from otclip.training.fashion_corpus import caption

    images, labels = fashion_mnist.load_split("test")
    rng = random.Random(seed)
    drawn = rng.sample(range(len(images)), 2 * n + n // 4)
    unpaired, texts, anchors = drawn[:n], drawn[n : 2 * n], drawn[2 * n :]
    encoder = Encoder(load_model("effnet-minilm", device=str(device)), batch_size=64, num_workers=0)
    x = encoder.encode_images([fashion_mnist.to_photo(images[i]) for i in unpaired + anchors], progress=False)
    y = encoder.encode_texts([caption(int(labels[i]), rng) for i in texts + anchors], progress=False)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    return x[:n], y[:n], x[n:], y[n:]


def measure(n: int, args, device: torch.device) -> dict:
    """One batch size: every regularizer, and our Sinkhorn against POT's, forward + backward. Synthetic clusters
    (anchors: the first n // 4 rows), or with `--data fashion-mnist` the default model's embeddings of real data."""
    if args.data == "fashion-mnist":
        x0, y0, a0, b0 = fashion_mnist_embeddings(n, device)
    else:
        x0, y0 = clustered(n, args.dim, device, 0), clustered(n, args.dim, device, 1)
        a0 = b0 = None
    scale = torch.tensor(2.659, device=device)

    def step(loss_fn):
        def run():
            x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
            if a0 is None:
                loss_fn(x, y, x[: n // 4], y[: n // 4]).backward()
            else:
                loss_fn(x, y, a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)).backward()
        return run

    base = bench(step(lambda x, y, a, b: clip_loss(x, y, scale)), args.repeat, device)
    # one (n x d) @ (d x n) product: the unit of the regularizers' floor (a cost matrix forward, one side backward)
    row = {"batch": n, "dim": x0.shape[1], "contrastive_ms": base,
           "matmul_ms": bench(lambda: x0 @ y0.T, args.repeat * 4, device)}
    for name in REGISTRY:  # pool-pairing terms get a batch of n // 4 pseudo-pairs (the pairing itself runs rarely)
        reg = build_regularizer(name, eps=args.eps)

        def with_reg(x, y, a, b, reg=reg):
            e = StepEmbeddings(a, b, x, y, scale, match_images=x[: n // 4], match_texts=y[: n // 4],
                               match_weights=torch.ones(n // 4, device=x.device))
            return clip_loss(x, y, scale) + sum(reg(e).values())

        row[f"{name}_ms"] = bench(step(with_reg), args.repeat, device)
        row[f"{name}_ratio"] = row[f"{name}_ms"] / base
    a = uniform(n, x0)
    ours = bench(step(lambda x, y, *_: entropic_ot(cosine_cost(x, y), eps=args.eps, tol=1e-4).value), args.repeat,
                 device)
    pot = bench(step(lambda x, y, *_: ot.sinkhorn2(a, a, cosine_cost(x, y), args.eps, method="sinkhorn_log",
                                                  numItermax=100, stopThr=1e-4)), max(1, args.repeat // 2), device)
    C = cosine_cost(x0, y0).double()
    ref = ot.sinkhorn(a.double(), a.double(), C, args.eps, method="sinkhorn_log", stopThr=1e-12, numItermax=20000)
    r = entropic_ot(cosine_cost(x0, y0), eps=args.eps, tol=1e-4)
    pot_plan = ot.sinkhorn(a, a, cosine_cost(x0, y0), args.eps, method="sinkhorn_log", numItermax=100, stopThr=1e-4)
    row.update({"our_sinkhorn_ms": ours, "pot_sinkhorn2_log_ms": pot, "pot_over_ours": pot / ours,
                "our_iterations": r.iterations,
                "our_plan_rel_error": float((r.plan.double() - ref).abs().sum() / ref.sum()),
                "pot_plan_rel_error": float((pot_plan.double() - ref).abs().sum() / ref.sum())})
    return row


def training_steps(batch: int = 64, steps: int = 5) -> dict:
    """Training steps/s of the default model with cached frozen features (heads only) and without
    (EfficientNet and MiniLM run on every step), the same batch and loss."""
    from otclip.engine import load_model
    from otclip.engine.sample_photos import SAMPLE_PHOTOS, sample_photo
    from otclip.training.trainable import TrainableModel

    loaded = load_model("effnet-minilm")
    model = TrainableModel(loaded)
    device = loaded.device
    pixels = torch.stack([loaded.preprocess(sample_photo(SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)].name))
                          for i in range(batch)]).to(device)
    tokens = loaded.tokenizer([SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)].caption + f" {i}" for i in range(batch)]).to(device)
    cached_img, cached_txt = model.image_features(pixels), model.text_features(tokens)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step(use_cache: bool) -> None:
        img = cached_img if use_cache else model.image_features(pixels)
        txt = cached_txt if use_cache else model.text_features(tokens)
        loss = clip_loss(model.image_head(img), model.text_head(txt), model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cached = bench(lambda: step(True), steps, device)
    uncached = bench(lambda: step(False), max(1, steps // 2), device)
    return {"batch": batch, "cached_steps_per_s": 1000 / cached, "uncached_steps_per_s": 1000 / uncached,
            "speedup": uncached / cached}


def trainer_steps(regs: tuple[str, ...] = ("none", "ot-pairwise"), steps: int = 200) -> dict:
    """`Trainer.train()` steps/s on cached features (the trainer's own loop: its batch drawing, optimizer, gradient
    clipping and logging around the losses), batch 64, on a Fashion-MNIST corpus of 300 images, 10% paired."""
    import tempfile

    from otclip.engine import fashion_mnist, load_model
    from otclip.training.fashion_corpus import build_fashion_mnist_corpus
    from otclip.training.trainer import TrainConfig, Trainer

    if not fashion_mnist.available():
        return {"skipped": "Debian's dataset-fashion-mnist is not installed"}
    loaded = load_model("effnet-minilm")
    out: dict = {"batch": 64, "steps": steps}
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus"
        build_fashion_mnist_corpus(corpus, 0.1, "sandal,bag", seed=0, train_size=300, val_size=100, test_size=100)

        def run(reg: str, n: int) -> float:
            cfg = TrainConfig(corpus=str(corpus), out=str(Path(work) / f"{reg}-{n}"), reg=reg, steps=n, batch_size=64,
                              eval_every=10**9, save_checkpoints=False)
            trainer = Trainer(cfg, progress=False, loaded=loaded)  # features cached by the first run
            t = time.perf_counter()
            trainer.train()
            return n / (time.perf_counter() - t)

        for reg in regs:
            run(reg, 3)
            out[f"{reg}_steps_per_s"] = max(run(reg, steps) for _ in range(2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-train-steps", action="store_true", help="skip the feature-cache section")
    ap.add_argument("--data", choices=["clusters", "fashion-mnist"], default="clusters",
                    help="synthetic clusters (default), or the default model's embeddings of Fashion-MNIST images and "
                         "captions (Debian's dataset-fashion-mnist)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [measure(n, args, device) for n in args.batches]
    print(f"device {device}; data {args.data}; eps {args.eps}; d {rows[0]['dim']}; times are forward + backward per step (ms)")
    names = list(REGISTRY)
    print(f"{'batch':>6}{'clip':>8}" + "".join(f"{n:>15}" for n in names) + f"{'ours':>8}{'POT log':>9}{'POT/ours':>9}")
    for r in rows:
        cells = "".join(f"{r[n + '_ms']:>8.1f} ({r[n + '_ratio']:.1f}x)" for n in names)
        print(f"{r['batch']:>6}{r['contrastive_ms']:>8.1f}{cells}"
              f"{r['our_sinkhorn_ms']:>8.1f}{r['pot_sinkhorn2_log_ms']:>9.1f}{r['pot_over_ours']:>9.1f}")
        print(f"       one {r['batch']} x {r['dim']} x {r['batch']} matrix product {r['matmul_ms']:.1f} ms")
        print(f"       plan L1 error vs converged POT: ours {r['our_plan_rel_error']:.2e} ({r['our_iterations']} it), "
              f"POT log-domain at the same tolerance {r['pot_plan_rel_error']:.2e}")
    steps = None if args.no_train_steps else training_steps()
    if steps:
        print(f"training steps/s at batch {steps['batch']}: {steps['cached_steps_per_s']:.1f} with the feature cache, "
              f"{steps['uncached_steps_per_s']:.2f} without ({steps['speedup']:.0f}x)")
        steps["trainer"] = trainer_steps()
        rates = {k.removesuffix("_steps_per_s"): v for k, v in steps["trainer"].items() if k.endswith("_steps_per_s")}
        print("Trainer.train() steps/s, batch 64, cached features: "
              + (", ".join(f"--reg {k} {v:.1f}" for k, v in rates.items()) or steps["trainer"].get("skipped", "")))
    suffix = "" if args.data == "clusters" else f"-{args.data}"
    out = Path(__file__).parent / "results" / f"ot_cost-{device.type}{suffix}.json"
    out.write_text(json.dumps({"device": str(device), "eps": args.eps, "dim": rows[0]["dim"], "data": args.data, "rows": rows,
                               "training_steps": steps}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

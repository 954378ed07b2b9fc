"""The training loop: L = L_clip(pairs) + alpha * R(unpaired), scheduled per regularizer, on cached frozen features.

Each step draws a paired batch and independent unpaired image and text batches (for regularizers
with a pool-level pairing, a batch of the current pseudo-pairs too). What the regularizer is, how
it is scheduled and whether it pairs the pool come from the registry in `losses`. Cosine schedule
with warmup, gradient accumulation, autocast on CUDA, a JSONL log of every term plus the embeddings'
spread, validation recall every N steps, best and last checkpoints, resume from last.pt after a crash, and data
parallelism under torchrun (embeddings all-gathered with gradients before the losses, so every rank
computes the loss of the global batch; gradients are then averaged over ranks).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from otclip.engine import LoadedModel, load_model, save_checkpoint
from otclip.engine.atomic_files import remove_dead_writers_files, write_lines_atomically
from otclip.engine.devices import autocast_for
from otclip.engine.distributed import init_from_env
from otclip.engine.manifests import MANIFEST_SUFFIXES
from otclip.engine.metrics import recall_at_k

from .config import POSITIVES, RegularizerOptions, TrainConfig, resumable_paths  # noqa: F401 (POSITIVES: re-exported)
from .corpus import CorpusRow, PartiallyPairedCorpus, load_corpus
from .feature_cache import FeatureCache
from .losses import ContrastiveLoss, StepEmbeddings, in_first_stage, lookup, step_total, uniformity
from .matching import Matching, PoolFeatures
from .trainable import TrainableModel


def corpus_paths(corpus: str) -> tuple[Path, Path | None]:
    """`--corpus` is a folder with a train manifest (and a val one), each CSV, JSONL or Parquet, or a single
    manifest file; a folder with two train (or val) manifests is refused (which one is meant?)."""
    p = Path(corpus)
    if not p.is_dir():
        return p, None

    def manifest(stem: str) -> Path | None:
        found = [p / f"{stem}{suffix}" for suffix in MANIFEST_SUFFIXES if (p / f"{stem}{suffix}").is_file()]
        if len(found) > 1:
            raise ValueError(f"{p}: {' and '.join(f.name for f in found)} are both in the corpus folder; keep one")
        return found[0] if found else None

    train = manifest("train")
    if train is None:
        names = ", ".join(f"train{suffix}" for suffix in MANIFEST_SUFFIXES)
        raise FileNotFoundError(f"{p}: no train manifest in the corpus folder ({names})")
    return train, manifest("val")


def multi_positive_loss(scores: np.ndarray, relevant: np.ndarray, scale: float) -> float:
    """Contrastive loss with every relevant item a positive: mean over both directions of
    -log(sum_{j relevant} e^{scale s_ij} / sum_j e^{scale s_ij}). Pair-identity InfoNCE would count
    a same-class caption as a negative; this does not."""
    s = torch.from_numpy(scores).double() * scale
    r = torch.from_numpy(relevant)
    out = 0.0
    for m, rel in ((s, r), (s.T, r.T)):
        out += float((torch.logsumexp(m, 1) - torch.logsumexp(m.masked_fill(~rel, -math.inf), 1)).mean())
    return out / 2


def _first_of_each(keys) -> dict:
    """{key: the first row holding it}, in order of first appearance."""
    first: dict = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    return first


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True, loaded: LoadedModel | None = None) -> None:
        self.cfg = config
        self.progress = progress
        self.ranks = init_from_env("nccl" if torch.cuda.is_available() else "gloo")
        self.out = Path(config.out)
        train_path, val_path = corpus_paths(config.corpus)
        # without a regularizer the pairs are all there is; with one, unpaired data alone is a valid corpus
        self.train_corpus: PartiallyPairedCorpus = load_corpus(train_path, split=None if val_path else "train",
                                                               require_pairs=config.reg == "none")
        val_source = val_path or train_path
        self.val_corpus = load_corpus(val_source, split=None if val_path else "val", require_pairs=False)
        # no val manifest and no row marked split=val: rows without a split are read as both, so the pairs validated
        # (and best.pt's choice) are the training pairs; said at the start and in the log, not hidden under "val_"
        self.validates_training_pairs = (val_path is None and bool(self.val_corpus.pairs)
                                         and not any(r.split == "val" for r in self.val_corpus.pairs))
        device = f"cuda:{self.ranks.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.loaded = loaded or load_model(config.model, device=device)
        # what `otclip wise-ft` interpolates towards: a spec that loads from any folder, and the weights' checksum
        self.start_model = {"spec": self.loaded.spec or config.model, "name": self.loaded.identity.name,
                            "checksum": self.loaded.identity.checksum}
        self.trainable = TrainableModel(self.loaded, config.unlock_image, config.unlock_text)
        self.contrastive = ContrastiveLoss()
        self.reg_spec = lookup(config.reg)
        self.reg_options = RegularizerOptions(
            eps=config.ot_eps, rho=config.ot_rho, debiased=config.debiased, loop_lambda=config.loop_lambda,
            match_rho=config.match_rho, match_min_mass=config.match_min_mass, match_min_certainty=config.match_min_certainty,
            match_clusters=config.match_clusters, match_structure=config.match_structure)
        self.regularizer = self.reg_spec.build(self.reg_options) if self.reg_spec else None
        if self.reg_spec and self.reg_spec.needs_pairs and not self.train_corpus.pairs:
            raise ValueError(f"--reg {config.reg} needs pairs (its anchors); {config.corpus} has none")
        self.step = 0
        self.best = -1.0
        self.matching = None
        self._load_features()
        self._refuse_without_both_unpaired_sides()
        # listed once: walking the model's modules for them twice a step took ~2.6 ms of a 15 ms cached step
        self.trained_parameters = self.trainable.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.trained_parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _cosine_lr(s, config.steps, config.warmup))

    # --- data ----------------------------------------------------------------------------------
    def _image_inputs(self, cache: FeatureCache, paths: list[str],
                      failures: list[tuple[int, str]] | None = None) -> torch.Tensor:
        """Cached frozen features, or (an image tower that runs every step) the pixels, uint8 where they can be; an
        unreadable image raises, or is left out and recorded in `failures`."""
        if self.trainable.cache_images:
            return cache.images(paths, failures)
        return cache.encoder.pixels(paths, progress=self.progress, failures=failures)

    def _refuse_without_both_unpaired_sides(self) -> None:
        """Every regularizer reads unpaired images and unpaired texts; with fewer than two of either (none in the
        corpus, or the unpaired images unreadable) its term is never computed, and the run would train the pairs
        alone under its name."""
        if self.regularizer is None:
            return
        images, texts = (0 if t is None else len(t) for t in (self.unp_img, self.unp_txt))
        if min(images, texts) < 2:
            raise ValueError(f"--reg {self.cfg.reg} aligns unpaired images with unpaired texts, but {self.cfg.corpus} "
                             f"has {images} (readable) unpaired images and {texts} unpaired texts (rows with an image "
                             "and no text, rows with a text and no image): add the missing ones, or use --reg none")

    def _readable(self, cache: FeatureCache, rows: list[CorpusRow]) -> tuple[list[CorpusRow], torch.Tensor | None]:
        """The rows whose image can be read, and their image inputs (None if no row is left); the others are skipped
        and reported (`self.unreadable`, RUN/errors.jsonl), as indexing does, with their captions, so that every
        image input stays beside its own row's."""
        if not rows:
            return rows, None
        failures: list[tuple[int, str]] = []
        inputs = self._image_inputs(cache, [r.image for r in rows], failures)
        listed = {e["path"] for e in self.unreadable}
        for i, reason in failures:  # listed once, also where a file is in two parts of the corpus
            if rows[i].image not in listed:
                listed.add(rows[i].image)
                self.unreadable.append({"path": rows[i].image, "reason": reason})
        left_out = {i for i, _ in failures}
        kept = [r for i, r in enumerate(rows) if i not in left_out]
        return kept, inputs.to(self.device) if kept else None

    def _text_inputs(self, cache: FeatureCache, texts: list[str]) -> torch.Tensor:
        return cache.texts(texts) if self.trainable.cache_texts else self.loaded.tokenizer(texts)

    def _load_features(self) -> None:
        cache = FeatureCache(self.trainable, progress=self.progress and self.ranks.rank == 0)
        c, v = self.train_corpus, self.val_corpus
        t0 = time.time()
        to = self.device
        self.unreadable: list[dict] = []
        c.pairs, self.pair_img = self._readable(cache, c.pairs)
        c.images, self.unp_img = self._readable(cache, c.images)
        val_pairs, self.val_img = self._readable(cache, v.pairs[: self.cfg.val_size])
        if self.unreadable and not c.pairs and (self.cfg.reg == "none" or self.reg_spec.needs_pairs):
            first = self.unreadable[0]
            raise ValueError(f"{self.cfg.corpus}: no pair has an image that can be read ({len(self.unreadable)} "
                             f"unreadable, the first {first['path']}: {first['reason']})")
        self.pair_txt = self._text_inputs(cache, [r.text for r in c.pairs]).to(to) if c.pairs else None
        self.pair_keys = self._positive_keys(c.pairs)
        self.unp_txt = self._text_inputs(cache, [r.text for r in c.texts]).to(to) if c.texts else None
        self.val_txt = self._text_inputs(cache, [r.text for r in val_pairs]).to(to) if val_pairs else None
        self.val_labels = [r.label for r in val_pairs]
        self.val_texts = [r.text for r in val_pairs]
        self.val_images = [r.image for r in val_pairs]
        self.feature_seconds = time.time() - t0

    def _positive_keys(self, pairs) -> torch.Tensor | None:
        """Per pair, an id shared by the pairs that count as positives of each other (None: only itself).
        Identical captions need no key: from a frozen text tower their embeddings are equal, so pair
        targets already give them the same loss and gradient as shared ones."""
        if self.cfg.positives == "pair":
            return None
        unlabelled = sum(r.label is None for r in pairs)
        if unlabelled:
            raise ValueError(f"--positives label: {self.cfg.corpus}: {unlabelled} of {len(pairs)} pairs have no label")
        ids = {k: i for i, k in enumerate(dict.fromkeys(r.label for r in pairs))}
        return torch.tensor([ids[r.label] for r in pairs])

    def _draw_global(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        """The global batch's indices, the same on every rank."""
        return torch.randperm(n, generator=gen)[:size] if n >= size else torch.randint(0, n, (size,), generator=gen)

    def _draw(self, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
        """This rank's slice of the global batch."""
        return self._draw_global(n, size, gen)[self.ranks.rank :: self.ranks.world_size]

    # --- one step ------------------------------------------------------------------------------
    def step_embeddings(self, gen: torch.Generator) -> StepEmbeddings:
        cfg, t, g = self.cfg, self.trainable, self.ranks.gather_with_grad
        world, rank = self.ranks.world_size, self.ranks.rank
        none = t.logit_scale.new_zeros((0, self.loaded.embed_dim))
        e = StepEmbeddings(pair_images=none, pair_texts=none, images=none, texts=none, logit_scale=t.logit_scale)
        if self.pair_img is not None:
            batch = self._draw_global(len(self.pair_img), cfg.batch_size, gen)
            pi = batch[rank::world]
            e.pair_images, e.pair_texts = g(t.image_head(self.pair_img[pi])), g(t.text_head(self.pair_txt[pi]))
            if self.pair_keys is not None:  # gathered rows are in rank order: rank 0's slice, then rank 1's, ...
                keys = self.pair_keys[torch.cat([batch[r::world] for r in range(world)])]
                e.pair_positives = (keys[:, None] == keys[None, :]).to(self.device)
        if self.regularizer is not None and self.unp_img is not None and self.unp_txt is not None:
            ii = self._draw(len(self.unp_img), cfg.unpaired_batch_size, gen)
            ti = self._draw(len(self.unp_txt), cfg.unpaired_batch_size, gen)  # drawn either way: the same run
            if self.reg_spec.reads_unpaired_batch:
                e.images, e.texts = g(t.image_head(self.unp_img[ii])), g(t.text_head(self.unp_txt[ti]))
        if self.matching is not None and len(self.matching.images) >= 2:
            batch = self._draw_global(len(self.matching.images), cfg.batch_size, gen)
            mi = batch[rank::world]
            e.match_images = g(t.image_head(self.unp_img[self.matching.images[mi]]))
            e.match_texts = g(t.text_head(self.unp_txt[self.matching.texts[mi]]))
            e.match_weights = g(self.matching.weights[mi].to(self.device))
            if self.matching.groups is not None:  # in the gathered rows' order, as the pairs' keys
                groups = self.matching.groups[torch.cat([batch[r::world] for r in range(world)])]
                e.match_positives = (groups[:, None] == groups[None, :]).to(self.device)
        return e

    def in_first_stage(self) -> bool:
        """Pairs alone first, for schedules that wait; with no pairs there is no first stage."""
        return (self.reg_spec is not None and self.pair_img is not None
                and in_first_stage(self.reg_spec.schedule, self.step, self.cfg.steps, self.cfg.pseudo_warmup))

    def losses(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        terms = self.contrastive(e)
        reg_terms = {}
        unpaired = self.unp_img is not None and self.unp_txt is not None
        if self.regularizer is not None and unpaired and (len(e.images) > 1 or not self.reg_spec.reads_unpaired_batch):
            reg_terms = self.regularizer(e)
        terms.update(reg_terms)
        schedule = self.reg_spec.schedule if self.reg_spec else "joint"
        terms["total"] = step_total(terms["contrastive_loss"], reg_terms, self.cfg.alpha, schedule, self.in_first_stage())
        return terms

    @torch.no_grad()
    def _refresh_matching(self) -> None:
        x, y = self.embed(self.unp_img, self.unp_txt)
        self.matching = self.reg_spec.pairing(x, y, self.reg_options, self.cfg.seed + self.step, self._pool_features(x, y))

    def _pool_features(self, x: torch.Tensor, y: torch.Tensor) -> PoolFeatures:
        """The frozen towers' features of the unpaired items and the pairs where they are cached, else the current
        embeddings (x, y: the unpaired items')."""
        t, px, py = self.trainable, self.pair_img, self.pair_txt
        if px is not None and not (t.cache_images and t.cache_texts):
            pair_x, pair_y = self.embed(px, py)
            px, py = (px if t.cache_images else pair_x), (py if t.cache_texts else pair_y)
        return PoolFeatures(self.unp_img if t.cache_images else x, self.unp_txt if t.cache_texts else y, px, py)

    # --- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, image_inputs: torch.Tensor, text_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of (cached) inputs with the current heads, in chunks."""
        t = self.trainable
        x = torch.cat([t.image_head(image_inputs[s : s + 1024]) for s in range(0, len(image_inputs), 1024)])
        y = torch.cat([t.text_head(text_inputs[s : s + 1024]) for s in range(0, len(text_inputs), 1024)])
        return x, y

    def inputs_for(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(Cached) image and text inputs of corpus rows that have both."""
        cache = FeatureCache(self.trainable, progress=False)
        return (self._image_inputs(cache, [r.image for r in rows]).to(self.device),
                self._text_inputs(cache, [r.text for r in rows]).to(self.device))

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_img is None:
            return {}
        return self.retrieval_metrics(self.val_img, self.val_txt, self.val_labels, "val_", self.val_texts, self.val_images)

    @torch.no_grad()
    def retrieval_metrics(self, image_inputs, text_inputs, labels, prefix: str = "", texts=None, images=None) -> dict:
        """Recall both ways between the distinct images and the distinct captions of some pair rows;
        plus the multi-positive loss and the images' uniformity.

        `texts` / `images` name each row's caption and image (default: every row distinct), so that an
        image with three captions is one item with three relevant captions, not three tied copies.
        Relevant: the same label when every row has one, else a caption and image that form a row."""
        t = self.trainable
        x, y = self.embed(image_inputs, text_inputs)
        texts = texts if texts is not None else range(len(x))
        images = images if images is not None else range(len(x))
        text_ids, image_ids = _first_of_each(texts), _first_of_each(images)
        text_rows, image_rows = list(text_ids.values()), list(image_ids.values())
        scores = (y[text_rows] @ x[image_rows].T).cpu().numpy()
        if any(lbl is None for lbl in labels):
            relevant = np.zeros(scores.shape, dtype=bool)
            tpos, ipos = {k: i for i, k in enumerate(text_ids)}, {k: i for i, k in enumerate(image_ids)}
            for tk, ik in zip(texts, images):
                relevant[tpos[tk], ipos[ik]] = True
        else:
            labels = np.array(labels, dtype=object)
            relevant = labels[text_rows][:, None] == labels[image_rows][None, :]
        t2i, i2t = recall_at_k(scores, relevant), recall_at_k(scores.T, relevant.T)
        out = {"loss": multi_positive_loss(scores, relevant, float(t.logit_scale.exp())),
               "t2i_R@1": t2i["R@1"], "t2i_R@5": t2i["R@5"], "i2t_R@1": i2t["R@1"], "i2t_R@5": i2t["R@5"],
               "mean_recall": (t2i["R@1"] + t2i["R@5"] + i2t["R@1"] + i2t["R@5"]) / 4, "uniformity": float(uniformity(x))}
        return {prefix + k: v for k, v in out.items()}

    # --- checkpoints ---------------------------------------------------------------------------
    def _train_state(self) -> dict:
        """What resuming needs to continue exactly as the uninterrupted run: with the pool's pseudo-pairs as they
        were (recomputing them at the resume step, from later weights, changed the run: #13 item 8)."""
        state = {"step": self.step, "best": self.best, "config": self.cfg.resume_fields(), "corpus": self._corpus_shape(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.matching is not None:
            state["matching"] = {k: v for k, v in vars(self.matching).items() if v is not None}
        return state

    def _corpus_shape(self) -> dict:
        """What the saved state's row indices (the pool's pseudo-pairs, the batches' draws) refer to: the rows
        trained on, after the unreadable images' rows were skipped."""
        c = self.train_corpus
        return {"pairs": len(c.pairs), "images": len(c.images), "texts": len(c.texts),
                "skipped": sorted(e["path"] for e in self.unreadable)}

    def save(self, name: str, with_state: bool) -> Path:
        extra = {"train_state": self._train_state()} if with_state else {"train_config": asdict(self.cfg)}
        return save_checkpoint(self.loaded, self.out / name, extra={**extra, "start_model": self.start_model})

    def try_resume(self) -> bool:
        last = self.out / "last.pt"
        if not self.cfg.save_checkpoints or not last.exists():
            return False
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
            state = ckpt["train_state"]
        except Exception as exc:  # cut short by a full disk or a copy, or not ours: say so, keep the file
            raise ValueError(f"{last}: cannot resume from it ({type(exc).__name__}: {str(exc)[:120]}); move it away "
                             "to start the run again, or resume from a copy") from None
        now = self.cfg.resume_fields()
        # a setting otclip gained after this run started reads as its default, which keeps the earlier behaviour
        added = {f.name: f.default for f in fields(TrainConfig) if f.name in now and f.name not in state["config"]}
        saved = resumable_paths({**added, **state["config"]})
        if saved != now:
            diff = sorted(k for k in {*saved, *now} if saved.get(k) != now.get(k))
            raise ValueError(f"{last}: a run with other settings ({', '.join(diff)}) is in this folder; use a new --out")
        shape = self._corpus_shape()
        was = state.get("corpus", shape)  # a checkpoint from before otclip saved it: taken as the same
        if was != shape:
            names = {"pairs": "pairs", "images": "unpaired images", "texts": "unpaired texts"}
            changed = [f"{name} {was.get(k)} -> {shape[k]}" for k, name in names.items() if was.get(k) != shape[k]]
            if was.get("skipped") != shape["skipped"]:
                changed.append(f"unreadable images {len(was.get('skipped') or [])} -> {len(shape['skipped'])}")
            raise ValueError(f"{last}: the corpus changed since this run started ({', '.join(changed)}); the saved "
                             "state's rows would point at other ones: use a new --out")
        self.loaded.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best = state["step"], state["best"]
        if "matching" in state:
            self.matching = Matching(**state["matching"])
        self._forget_log_after(self.step)
        return True

    def _forget_log_after(self, step: int) -> None:
        """Drop the log records of steps after the checkpoint (a killed run logged them; they are trained again)."""
        path = self.out / "log.jsonl"
        if self.ranks.rank != 0 or not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()

        def before(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:  # a line the kill cut short
                return False

        keep = [line for line in lines if line.strip() and before(line)]
        if len(keep) != len(lines):
            write_lines_atomically(path, keep)

    def validation_source(self) -> str:
        """Where the validation recall comes from, in words."""
        if self.validates_training_pairs:
            return (f"the training pairs ({self.cfg.corpus} has no val manifest and no row with split=val): best.pt is "
                    "the step that fits them best; mark some pairs split=val to hold them out")
        return f"{len(self.val_texts)} held-out pairs" if self.val_texts else "no validation pairs (no row with split=val)"

    # --- loop ----------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, main = self.cfg, self.ranks.rank == 0
        self.out.mkdir(parents=True, exist_ok=True)
        if main:
            remove_dead_writers_files(self.out)  # a killed run's half-written checkpoint
        resumed = self.try_resume()
        log = open(self.out / "log.jsonl", "a", encoding="utf-8") if main else None
        if main:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            write_lines_atomically(self.out / "errors.jsonl", [json.dumps(e, ensure_ascii=False) for e in self.unreadable])
            log.write(json.dumps({"event": "resume" if resumed else "start", "step": self.step,
                                  "corpus": self.train_corpus.summary(), "feature_seconds": self.feature_seconds,
                                  "skipped": len(self.unreadable), "validation": self.validation_source()}) + "\n")
        start, t0 = self.step, time.time()
        if main and not resumed:
            log.write(json.dumps({"step": 0, **self.validate()}) + "\n")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.reg}", disable=not (self.progress and main))
        last_val: dict = {}
        while self.step < cfg.steps:
            if (self.reg_spec is not None and self.reg_spec.pairing is not None and self.unp_img is not None
                    and self.unp_txt is not None and not self.in_first_stage()
                    and (self.matching is None or self.step % cfg.match_every == 0)):
                self._refresh_matching()
            self.optimizer.zero_grad(set_to_none=True)
            logged: dict[str, float] = {}
            for micro in range(cfg.accum):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step * cfg.accum + micro)
                with autocast_for(self.device):
                    e = self.step_embeddings(gen)
                    terms = self.losses(e)
                if terms["total"].requires_grad:  # e.g. no pairs and no pseudo-pairs found yet: nothing to learn
                    (terms["total"] / cfg.accum).backward()
                for k, v in terms.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg.accum
            self.ranks.average_gradients(self.trained_parameters)
            torch.nn.utils.clip_grad_norm_(self.trained_parameters, 5.0)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                self.trainable.logit_scale.clamp_(0, math.log(100))
            self.step += 1
            bar.update(1)
            if main:
                record = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], **logged}
                spread_of = next((x for x in (e.pair_images, e.images, e.match_images) if x is not None and len(x) > 1),
                                 None)
                if spread_of is not None:
                    record["uniformity_images"] = float(uniformity(spread_of.detach()))
                if self.matching is not None:
                    record["matched_pairs"] = int(len(self.matching.images))
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_val = self.validate()
                    record.update(last_val)
                    if last_val and last_val["val_mean_recall"] > self.best:
                        self.best = last_val["val_mean_recall"]
                        if cfg.save_checkpoints:
                            self.save("best.pt", with_state=False)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{logged['total']:.3f}")
                if cfg.save_checkpoints and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    self.save("last.pt", with_state=True)
        bar.close()
        if main:
            if cfg.save_checkpoints and not (self.out / "best.pt").exists():
                self.save("best.pt", with_state=False)
            summary = {"event": "end", "steps": self.step, "trained_steps": self.step - start,
                       "seconds": time.time() - t0, "skipped": len(self.unreadable), "best_val_mean_recall": self.best,
                       **last_val}
            log.write(json.dumps(summary) + "\n")
            log.close()
            return summary
        return {}

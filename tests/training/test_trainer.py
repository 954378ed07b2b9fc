"""Real training runs on a small Fashion-MNIST corpus (frozen features cached once per machine)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from otclip.engine import fashion_mnist
from otclip.training.losses import REGISTRY

pytestmark = pytest.mark.skipif(not fashion_mnist.available(), reason="Debian's dataset-fashion-mnist is not installed")


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def train(corpus, out, **kw):
    from otclip.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(corpus=str(corpus), out=str(out), steps=kw.pop("steps", 60), eval_every=kw.pop("eval_every", 20),
                      batch_size=32, unpaired_batch_size=64, **kw)
    return Trainer(cfg, progress=False).train()


def test_training_lowers_val_loss_and_raises_recall_over_the_untrained_default(small_corpus, tmp_path):
    summary = train(small_corpus, tmp_path / "run")
    log = read_log(tmp_path / "run")
    before = next(r for r in log if r.get("step") == 0 and "val_loss" in r)
    assert summary["val_loss"] < before["val_loss"]
    assert summary["val_mean_recall"] > before["val_mean_recall"]
    assert summary["val_i2t_R@5"] > 0  # image -> text runs over distinct captions: no tie artefacts
    step_terms = [r for r in log if "contrastive_loss" in r]
    assert len(step_terms) == 60 and all("uniformity_images" in r for r in step_terms)


@pytest.mark.parametrize("reg", list(REGISTRY))
def test_no_regularizer_collapses(small_corpus, tmp_path, reg):
    clusters = {"match_clusters": 8} if REGISTRY[reg].needs_clusters else {}  # the corpus's 8 classes (2 unseen)
    summary = train(small_corpus, tmp_path / reg, reg=reg, alpha=0.5, match_every=20, **clusters)
    log = read_log(tmp_path / reg)
    before = next(r for r in log if r.get("step") == 0 and "val_loss" in r)
    named = {k for r in log for k in r}
    expected = {"ot-pairwise": "ot_pairwise", "ot-loop": "ot_loop_consistency", "ot-barycenter": "ot_barycenter",
                "ot-match": "ot_match", "ot-cluster": "ot_cluster", "mmcl-nakada": "mmcl_nakada",
                "mmcl-pool": "mmcl_pool"}[reg]
    assert expected in named  # each term is logged by name
    assert summary["val_uniformity"] < -1.0  # spread kept: a collapsed embedding has uniformity near 0
    assert summary["val_mean_recall"] > before["val_mean_recall"]


def test_checkpoint_loads_in_the_engine_and_indexes(small_corpus, tmp_path):
    from otclip.engine import Encoder, load_model
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    train(small_corpus, tmp_path / "run", steps=20)
    best = tmp_path / "run" / "best.pt"
    loaded = load_model(str(best), device="cpu")
    assert loaded.identity.name == "effnet-minilm@best.pt"
    assert Encoder(loaded).encode_texts(["a shirt"]).shape == (1, 384)
    index_images(small_corpus / "images" / "val", tmp_path / "ix", str(best), progress=False, workers=0)
    searcher = IndexSearcher(tmp_path / "ix")
    assert searcher.model.identity.checksum == loaded.identity.checksum
    assert len(searcher.search_text("a trouser", k=3)) == 3
    # indexing with the loaded model records a spec that reloads it (#13 item 7: it recorded the bare name)
    index_images(small_corpus / "images" / "val", tmp_path / "ix2", loaded, progress=False, workers=0,
                 query_models=False, thumbnails=False)
    assert json.loads((tmp_path / "ix2" / "manifest.json").read_text())["model"]["spec"] == str(best.resolve())
    assert IndexSearcher(tmp_path / "ix2").model.identity.checksum == loaded.identity.checksum


def test_resume_after_kill(small_corpus, tmp_path):
    """Killed after a checkpoint, the same command resumes from it, also typed in another folder with relative paths;
    the half-written checkpoint a kill leaves (`.last.pt.tmpPID`, 100+ MB) is removed, and a temporary file of a live
    process is kept."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "otclip", "train", "--corpus", str(small_corpus), "--out", str(run), "--steps", "60",
           "--save-every", "10", "--eval-every", "1000", "--batch-size", "32", "--unpaired-batch-size", "64",
           "--reg", "ot-pairwise", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "last.pt").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    half_written, live = run / f".last.pt.tmp{proc.pid}", run / f".best.pt.tmp{os.getpid()}"
    half_written.write_bytes(b"PK\x03\x04 cut short by the kill")  # whether or not the kill fell mid-save
    live.write_bytes(b"being written")
    # the same command typed in another folder: relative paths to the same corpus and run (refused as other settings)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = [os.path.relpath(a, elsewhere) if a in (str(small_corpus), str(run)) else a for a in cmd]
    done = subprocess.run(relative, capture_output=True, text=True, timeout=900, cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not half_written.exists() and live.exists()
    log = read_log(run)
    assert [r["event"] for r in log if "event" in r][:2] == ["start", "resume"]
    end = log[-1]
    assert end["event"] == "end" and end["steps"] == 60 and 0 < end["trained_steps"] < 60
    resumed_at = next(r["step"] for r in log if r.get("event") == "resume")
    assert resumed_at % 10 == 0 and resumed_at > 0


def test_two_process_gloo_matches_one_process(small_corpus, tmp_path):
    base = ["--corpus", str(small_corpus), "--steps", "3", "--batch-size", "32", "--unpaired-batch-size", "64",
            "--reg", "ot-loop", "--positives", "label", "--no-progress", "--eval-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "otclip", "train", "--out", str(tmp_path / "one"), *base],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "-m", "otclip", "train", "--out", str(tmp_path / "two"), *base],
                         capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = [r for r in read_log(tmp_path / "one") if "total" in r]
    two = [r for r in read_log(tmp_path / "two") if "total" in r]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for term in ("contrastive_loss", "ot_loop_IT", "ot_loop_consistency", "total"):
            assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-5)


def test_label_positives_group_the_pairs_of_a_class(small_corpus, tmp_path):
    from otclip.training.trainer import TrainConfig, Trainer

    def trainer(mode):
        return Trainer(TrainConfig(corpus=str(small_corpus), out=str(tmp_path), positives=mode, save_checkpoints=False),
                       progress=False)

    assert trainer("pair").pair_keys is None
    t = trainer("label")
    pairs, keys = t.train_corpus.pairs, t.pair_keys
    for i in range(len(pairs)):
        for j in range(len(pairs)):
            assert bool(keys[i] == keys[j]) == (pairs[i].label == pairs[j].label)
    assert len(set(keys.tolist())) > 1
    e = t.step_embeddings(torch.Generator().manual_seed(0))
    assert e.pair_positives.shape == (t.cfg.batch_size, t.cfg.batch_size)
    assert e.pair_positives.diagonal().all() and e.pair_positives.sum() > len(e.pair_positives)


def test_label_positives_need_labels(tmp_path):
    from otclip.training.trainer import TrainConfig, Trainer

    with pytest.raises(ValueError, match="--positives 'class'"):
        TrainConfig(corpus="c", out="o", positives="class")
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(img)
    rows = [{"image": str(img), "text": "a red square", "label": "red"}, {"image": str(img), "text": "a red patch"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="--positives label: .*1 of 2 pairs have no label"):
        Trainer(TrainConfig(corpus=str(tmp_path), out=str(tmp_path / "r"), positives="label"), progress=False)


def test_a_regularizer_without_unpaired_images_or_texts_is_refused(small_corpus, tmp_path, default_model):
    """A corpus of pairs and unpaired images only (a user's captioned manifest) trained with --reg ot-pairwise had
    run as the pairs alone: the term is computed only where both unpaired sides exist."""
    from otclip.training.trainer import TrainConfig, Trainer

    rows = [json.loads(line) for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    for kept, missing in (("image", "0 unpaired texts"), ("text", r"0 \(readable\) unpaired images")):
        corpus = tmp_path / kept
        corpus.mkdir()
        (corpus / "train.jsonl").write_text("".join(json.dumps({**r, "image": str(small_corpus / r["image"])} if "image" in r
                                                               else r) + "\n" for r in rows if kept in r))
        for reg in ("ot-pairwise", "mmcl-nakada"):
            with pytest.raises(ValueError, match=f"--reg {reg} aligns unpaired images with unpaired texts, .* {missing}"):
                Trainer(TrainConfig(corpus=str(corpus), out=str(tmp_path / "r"), reg=reg), False, default_model)
        Trainer(TrainConfig(corpus=str(corpus), out=str(tmp_path / "r")), False, default_model)  # pairs alone: asked


def test_bad_corpus_is_a_one_line_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "only text"}\n')
    done = subprocess.run([sys.executable, "-m", "otclip", "train", "--corpus", str(tmp_path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no pairs at all" in done.stderr and "Traceback" not in done.stderr


def test_unlocked_towers_train_their_last_blocks(small_corpus, tmp_path):
    from otclip.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(corpus=str(small_corpus), out=str(tmp_path / "run"), steps=2, eval_every=2, batch_size=8,
                      unlock_image=2, unlock_text=1, val_size=16, save_checkpoints=False)  # 2: head + last block
    trainer = Trainer(cfg, progress=False)
    assert not trainer.trainable.cache_images and not trainer.trainable.cache_texts
    # the image inputs are kept as uint8 pixels, and the tower embeds them as it embeds the files through the model's
    # own torchvision preprocessing (float pixels, normalised)
    from otclip.engine.images import load_image

    assert trainer.pair_img.dtype == trainer.unp_img.dtype == torch.uint8 and len(trainer.val_img) == 16
    loaded = trainer.loaded
    with torch.no_grad():
        heads = trainer.trainable.image_head(trainer.val_img[:6]).numpy()
        pixels = torch.stack([loaded.preprocess(load_image(p, draft=loaded.image_size)) for p in trainer.val_images[:6]])
        reference = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(heads, reference, atol=1e-5)
    model = trainer.loaded.model
    last_block = next(model.visual.trunk.blocks[-1].parameters())
    first_block = next(model.visual.trunk.blocks[0].parameters())
    last_layer = next(model.text.transformer.encoder.layer[-1].parameters())
    assert last_block.requires_grad and not first_block.requires_grad and last_layer.requires_grad
    before = last_block.detach().clone()
    summary = trainer.train()
    assert summary["steps"] == 2 and not torch.equal(before, last_block.detach())


def test_a_truncated_last_checkpoint_is_a_one_line_error(small_corpus, tmp_path):
    """#13 item 7: a last.pt cut short (full disk, interrupted copy) is named, and kept."""
    from otclip.training.trainer import TrainConfig, Trainer

    run = tmp_path / "run"
    run.mkdir()
    damaged = b"PK\x03\x04 cut short"
    (run / "last.pt").write_bytes(damaged)
    trainer = Trainer(TrainConfig(corpus=str(small_corpus), out=str(run), steps=5, batch_size=32,
                                  unpaired_batch_size=64), progress=False)
    with pytest.raises(ValueError, match="last.pt: cannot resume from it"):
        trainer.try_resume()
    assert (run / "last.pt").read_bytes() == damaged


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(small_corpus, tmp_path):
    """A run started by an otclip without --match-min-certainty resumes (the setting reads as its default, 0,
    the earlier behaviour); asking for another value than the default is still refused, naming it."""
    from otclip.training.trainer import TrainConfig, Trainer

    def config(**kw):
        return TrainConfig(corpus=str(small_corpus), out=str(tmp_path / "run"), batch_size=32, unpaired_batch_size=64,
                           reg="ot-match", eval_every=100, save_every=1, **kw)

    Trainer(config(steps=2), progress=False).train()
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    del ckpt["train_state"]["config"]["match_min_certainty"]  # what an older otclip saved
    torch.save(ckpt, last)
    trainer = Trainer(config(steps=4), progress=False)
    trainer.try_resume()
    assert trainer.step == 2
    with pytest.raises(ValueError, match=r"other settings \(match_min_certainty\)"):
        Trainer(config(steps=4, match_min_certainty=0.3), progress=False).try_resume()


@pytest.mark.parametrize("reg, settings", [("ot-match", {}), ("ot-cluster", {"match_clusters": 8})])
def test_a_resumed_pool_pairing_run_is_the_uninterrupted_run(small_corpus, tmp_path, monkeypatch, reg, settings):
    """#13 item 8: killed after its checkpoint at step 20 and resumed, a run with pool-level pseudo-pairs ends with
    the weights of the run that was never interrupted (its pseudo-pairs, computed at step 15, are restored with
    their groups, not recomputed at 20), and the log has one record per step."""
    from otclip.training.trainer import TrainConfig, Trainer

    def config(out):
        return TrainConfig(corpus=str(small_corpus), out=str(out), reg=reg, steps=40, save_every=10, eval_every=1000,
                           match_every=15, pseudo_warmup=0.2, batch_size=32, unpaired_batch_size=64, **settings)

    Trainer(config(tmp_path / "whole"), progress=False).train()

    class Killed(Exception):
        pass

    save = Trainer.save

    def save_then_die(self, name, with_state):
        path = save(self, name, with_state)
        if name == "last.pt" and self.step == 20:
            raise Killed
        return path

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        Trainer(config(tmp_path / "resumed"), progress=False).train()
    monkeypatch.setattr(Trainer, "save", save)
    with open(tmp_path / "resumed" / "log.jsonl", "a") as log:  # what a kill after step 20 leaves behind
        log.write(json.dumps({"step": 21, "total": 1.0}) + "\n" + '{"step": 22, "tot')  # the last line cut short
    Trainer(config(tmp_path / "resumed"), progress=False).train()

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["state_dict"]
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    steps = [r["step"] for r in read_log(tmp_path / "resumed") if "total" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40


@pytest.mark.parametrize("reg", [name for name, spec in REGISTRY.items() if not spec.reads_unpaired_batch])
def test_pool_pairing_terms_do_not_embed_the_unpaired_batch_and_train_the_same(small_corpus, tmp_path, monkeypatch, reg):
    """A term that reads only its pseudo-pairs: the step's unpaired batch (48 rows here) never reaches the towers'
    heads (with an unlocked tower each would be a full forward pass), and the run ends with the weights of a run
    that embeds it (its indices are still drawn, so every later draw is the same)."""
    from dataclasses import replace

    from otclip.training import losses, trainer
    from otclip.training.trainer import TrainConfig, Trainer

    settings = {"match_clusters": 8} if REGISTRY[reg].needs_clusters else {}

    def run(out):
        cfg = TrainConfig(corpus=str(small_corpus), out=str(out), reg=reg, steps=20, eval_every=1000, match_every=10,
                          pseudo_warmup=0.2, batch_size=32, unpaired_batch_size=48, **settings)
        t = Trainer(cfg, progress=False)
        rows = []
        for head in ("image_head", "text_head"):
            original = getattr(t.trainable, head)
            monkeypatch.setattr(t.trainable, head, lambda x, original=original: rows.append(len(x)) or original(x))
        t.train()
        return torch.load(out / "last.pt", weights_only=True)["state_dict"], rows

    skipping, rows = run(tmp_path / "skipping")
    assert 48 not in rows and 32 in rows
    embedding_spec = replace(REGISTRY[reg], reads_unpaired_batch=True)  # what every term did before
    monkeypatch.setitem(losses.REGISTRY, reg, embedding_spec)
    monkeypatch.setattr(trainer, "lookup", lambda name: embedding_spec)
    embedding, rows = run(tmp_path / "embedding")
    assert 48 in rows
    for name in skipping:
        torch.testing.assert_close(skipping[name], embedding[name], rtol=0, atol=1e-6, msg=name)
    terms = [r for r in read_log(tmp_path / "skipping") if REGISTRY[reg].name.replace("-", "_") in r]
    assert terms and any(r[reg.replace("-", "_")] != 0 for r in terms)  # the term was computed and logged


@pytest.mark.parametrize("unlock_image", [0, 1])
def test_unreadable_images_are_skipped_with_their_rows_and_reported(small_corpus, tmp_path, unlock_image):
    """A pair's image, an unpaired image and a validation image that cannot be decoded are left out with their rows
    and listed in RUN/errors.jsonl; every image input left stays beside its own row's caption (with an unlocked tower
    the unreadable image used to be dropped from the pixels alone, so every later image sat beside another row's
    caption): checked against the model's own encoding of the files and captions."""
    import shutil

    from otclip.engine.images import load_image
    from otclip.training.trainer import TrainConfig, Trainer

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    train_rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    pair = next(r for r in train_rows if r.get("image") and r.get("text"))
    unpaired = next(r for r in train_rows if r.get("image") and not r.get("text"))
    val = json.loads((corpus / "val.jsonl").read_text().splitlines()[1])
    for row in (pair, unpaired, val):
        (corpus / row["image"]).write_bytes(b"not a png")
    cfg = TrainConfig(corpus=str(corpus), out=str(tmp_path / "run"), reg="ot-pairwise", steps=1, eval_every=1,
                      batch_size=8, unpaired_batch_size=8, unlock_image=unlock_image, val_size=16,
                      save_checkpoints=False)
    trainer = Trainer(cfg, progress=False)
    bad = {str(corpus / r["image"]) for r in (pair, unpaired, val)}
    assert {e["path"] for e in trainer.unreadable} == bad and all(e["reason"] for e in trainer.unreadable)
    pairs = trainer.train_corpus.pairs
    n_pairs = sum(1 for r in train_rows if r.get("image") and r.get("text"))
    assert len(pairs) == len(trainer.pair_img) == len(trainer.pair_txt) == n_pairs - 1
    assert len(trainer.val_img) == len(trainer.val_txt) == len(trainer.val_images) == 15
    assert not bad & {r.image for r in pairs} and not bad & set(trainer.val_images)
    loaded, heads = trainer.loaded, trainer.trainable
    val_rows = list(zip(trainer.val_images, trainer.val_texts))
    with torch.no_grad():
        for inputs, texts, rows in ((trainer.pair_img, trainer.pair_txt, [(r.image, r.text) for r in pairs]),
                                    (trainer.val_img, trainer.val_txt, val_rows)):
            some = list(range(0, len(rows), max(1, len(rows) // 6)))
            pixels = torch.stack([loaded.preprocess(load_image(rows[k][0], draft=loaded.image_size)) for k in some])
            images = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1)
            captions = loaded.model.encode_text(loaded.tokenizer([rows[k][1] for k in some]))
            np.testing.assert_allclose(heads.image_head(inputs[some]).numpy(), images.numpy(), atol=1e-5)
            np.testing.assert_allclose(heads.text_head(texts[some]).numpy(),
                                       torch.nn.functional.normalize(captions, dim=-1).numpy(), atol=1e-5)
    summary = trainer.train()
    assert summary["skipped"] == 3 and summary["steps"] == 1
    listed = [json.loads(line) for line in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    assert {e["path"] for e in listed} == bad


def test_a_corpus_whose_pairs_all_cannot_be_read_is_a_one_line_error(tmp_path):
    from otclip.training.trainer import TrainConfig, Trainer

    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "a.png", "text": "a red square"}) + "\n")
    with pytest.raises(ValueError, match=r"no pair has an image that can be read \(1 unreadable, the first .*a\.png"):
        Trainer(TrainConfig(corpus=str(tmp_path), out=str(tmp_path / "r")), progress=False)


def test_a_run_resumed_on_a_changed_corpus_is_a_one_line_error(small_corpus, tmp_path):
    """The saved state's row indices (pool pseudo-pairs) refer to the rows trained on: a resume after an image became
    unreadable (its row now skipped) would pair other rows, so it is refused, naming what changed."""
    import shutil

    from otclip.training.trainer import TrainConfig, Trainer

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    cfg = TrainConfig(corpus=str(corpus), out=str(tmp_path / "run"), reg="ot-match", steps=1, batch_size=8,
                      val_size=8)
    Trainer(cfg, progress=False).train()
    assert Trainer(cfg, progress=False).train()["trained_steps"] == 0  # the same corpus resumes (nothing left to do)
    unpaired = next(json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()
                    if json.loads(line).get("image") and not json.loads(line).get("text"))
    (corpus / unpaired["image"]).write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"last\.pt: the corpus changed since this run started \(unpaired images "
                                         r"(\d+) -> (\d+), unreadable images 0 -> 1\); .* use a new --out"):
        Trainer(cfg, progress=False).train()

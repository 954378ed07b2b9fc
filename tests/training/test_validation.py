"""The trainer's validation recall when images have several captions (it chooses best.pt and the
experiment's hyper-parameters), against a brute force over the engine's own embeddings."""

import copy
import json

import numpy as np


def test_several_captions_per_image(tmp_path, default_model, encoder):
    from otclip.engine.sample_photos import SAMPLE_PHOTOS, write_sample_photos
    from otclip.training.trainer import TrainConfig, Trainer

    paths = [str(p) for p in write_sample_photos(tmp_path / "photos")]
    captions = [[p.caption, f"a photo of {p.caption}", f"{p.caption}, seen up close"] for p in SAMPLE_PHOTOS]
    rows = [{"image": path, "text": text} for path, texts in zip(paths, captions) for text in texts]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(corpus=str(tmp_path), out=str(tmp_path / "run"), steps=1, save_checkpoints=False)
    got = Trainer(cfg, progress=False, loaded=default_model).validate()

    x = encoder.encode_images(paths, progress=False)
    flat = [t for texts in captions for t in texts]
    y = encoder.encode_texts(flat, progress=False)
    owner = np.repeat(np.arange(len(paths)), 3)
    t2i = float(np.mean((y @ x.T).argmax(1) == owner))  # each caption: is its own image the top one?
    i2t = float(np.mean(owner[(x @ y.T).argmax(1)] == np.arange(len(paths))))  # each image: a caption of its own first?
    assert t2i > 0.5
    assert abs(got["val_t2i_R@1"] - t2i) <= 1 / len(flat) + 1e-9
    assert abs(got["val_i2t_R@1"] - i2t) <= 1 / len(paths) + 1e-9


def test_a_manifest_without_a_val_split_says_it_validates_on_the_training_pairs(tmp_path, default_model):
    """Rows without a split are read as training and validation rows alike: with no val manifest and no row marked
    split=val, the "val_" recall (and best.pt's choice) is the training pairs' recall. Said at the start, in the log
    and on stderr, rather than reported as held out."""
    from otclip.engine.sample_photos import SAMPLE_PHOTOS, write_sample_photos
    from otclip.training.trainer import TrainConfig, Trainer

    trained = copy.deepcopy(default_model)  # train() changes the weights: not the session's shared model
    paths = [str(p) for p in write_sample_photos(tmp_path / "photos")]
    rows = [{"image": path, "text": p.caption} for path, p in zip(paths, SAMPLE_PHOTOS)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    marked = [{**r, "split": "val" if i < 2 else "train"} for i, r in enumerate(rows)]
    (tmp_path / "marked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    (tmp_path / "train-only.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    for manifest, on_training_pairs in (("all.jsonl", True), ("marked.jsonl", False), ("train-only.jsonl", False)):
        cfg = TrainConfig(corpus=str(tmp_path / manifest), out=str(tmp_path / f"run-{manifest}"), steps=1,
                          save_checkpoints=False)
        trainer = Trainer(cfg, progress=False, loaded=trained)
        assert trainer.validates_training_pairs is on_training_pairs
        held_out = {"all.jsonl": rows, "marked.jsonl": rows[:2], "train-only.jsonl": []}[manifest]
        assert set(trainer.val_texts) == {r["text"] for r in held_out}
        trainer.train()
        start = json.loads((tmp_path / f"run-{manifest}" / "log.jsonl").read_text().splitlines()[0])
        expected = "the training pairs" if on_training_pairs else f"{len(held_out)} held-out" if held_out else "no validation"
        assert start["validation"].startswith(expected)

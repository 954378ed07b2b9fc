"""The trainer's validation recall when images have several captions (it chooses best.pt and the
experiment's hyper-parameters), against a brute force over the engine's own embeddings."""

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

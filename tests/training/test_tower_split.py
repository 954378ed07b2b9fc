"""Training caches each locked tower up to its last projection (`tower_split`): the head of the cached features must be
the tower's own output, only the final projections (and the logit scale) train, and a run on cached features trains
the weights that running the towers every step trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from otclip.engine import load_model
from otclip.training.trainable import TrainableModel

# what trains with the towers locked, by hand from each architecture's layout: a ViT's `proj`, a timm tower's head,
# CLIP's and TextTransformer's `text_projection`; a ModifiedResNet (attention pool) and MobileCLIP's timm tower (empty
# head) have no projection after their frozen parts
LOCKED_TRAINABLE = {
    "ViT-S-32": {"logit_scale", "visual.proj", "text_projection"},
    "RN50": {"logit_scale", "text_projection"},
    "convnext_tiny": {"logit_scale", "visual.head.proj.weight", "text_projection"},
    "MobileCLIP-S1": {"logit_scale", "text.text_projection"},
}


@pytest.mark.parametrize("spec", sorted(LOCKED_TRAINABLE))
def test_cached_features_through_the_heads_are_the_towers_outputs(spec):
    loaded = load_model(spec)
    trainable = TrainableModel(loaded)
    trains = {name for name, p in loaded.model.named_parameters() if p.requires_grad}
    assert trains == LOCKED_TRAINABLE[spec]
    assert trainable.cache_images and trainable.cache_texts
    size = loaded.image_size if isinstance(loaded.image_size, int) else loaded.image_size[0]
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenizer(["a photo of a cat", "two dogs on a beach", "a red car"])
    with torch.no_grad():  # open_clip's own forward passes are the reference
        images = F.normalize(loaded.model.encode_image(pixels, normalize=False), dim=-1)
        texts = F.normalize(loaded.model.encode_text(tokens, normalize=False), dim=-1)
        image_features, text_features = trainable.image_features(pixels), trainable.text_features(tokens)
    image_heads, text_heads = trainable.image_head(image_features), trainable.text_head(text_features)
    torch.testing.assert_close(image_heads, images, rtol=0, atol=1e-5)
    torch.testing.assert_close(text_heads, texts, rtol=0, atol=1e-5)
    # the heads read the parameters that train: each one gets a gradient
    (image_heads.sum() + text_heads.sum() + (image_heads @ text_heads.T).sum()).backward()
    for name, p in loaded.model.named_parameters():
        if name in trains and name != "logit_scale":
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize(("spec", "unlock_image", "unlock_text", "trains", "frozen"), [
    ("ViT-S-32", 2, 2, ["visual.transformer.resblocks.11.", "visual.ln_post.", "visual.proj", "transformer.resblocks.11.",
                        "ln_final.", "text_projection"],
     ["visual.transformer.resblocks.10.", "visual.conv1.", "transformer.resblocks.10.", "token_embedding."]),
    ("convnext_tiny", 2, 0, ["visual.trunk.stages.3.", "visual.trunk.head.norm.", "visual.head.proj.", "text_projection"],
     ["visual.trunk.stages.2.", "visual.trunk.stem.", "transformer."]),
    ("ViT-S-32", 1, 1, ["visual.proj", "text_projection"],  # the last group is the projection: both sides stay cached
     ["visual.transformer.", "visual.ln_post.", "transformer.", "ln_final."]),
])
def test_unlocking_trains_the_last_groups_and_runs_that_tower_every_step(spec, unlock_image, unlock_text, trains, frozen):
    """open_clip's groups (a ViT's last group is its projection, a timm trunk's its head's norm): a timm tower's lock
    only freezes, so the unlocked groups must be trainable before it runs. A side runs every step exactly where
    something before its head trains (the frozen list names none of the cached sides' parameters)."""
    loaded = load_model(spec)
    trainable = TrainableModel(loaded, unlock_image=unlock_image, unlock_text=unlock_text)
    names = [name for name, p in loaded.model.named_parameters() if p.requires_grad]
    for prefix in trains:
        assert any(name.startswith(prefix) for name in names), prefix
    for prefix in frozen:
        assert not any(name.startswith(prefix) for name in names), prefix
    opened = {"ViT-S-32": (unlock_image > 1, unlock_text > 1), "convnext_tiny": (unlock_image > 0, unlock_text > 1)}[spec]
    assert (not trainable.cache_images, not trainable.cache_texts) == opened


def test_a_tower_that_cannot_be_partly_unlocked_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"--unlock-image 1: ModifiedResNet towers cannot be partly unlocked"):
        TrainableModel(load_model("RN50"), unlock_image=1)


def test_a_run_on_cached_features_trains_what_running_the_towers_every_step_trains(small_corpus, tmp_path, monkeypatch):
    """ViT-S-32: the cache holds the pooled features before each projection (width 384), and two steps of `ot-pairwise` on them
    leave the projections where two steps that run the whole towers on the pixels and tokens leave them."""
    import otclip.training.trainer as trainer_module
    from otclip.training.trainer import TrainConfig, Trainer

    def run(out: str) -> Trainer:
        cfg = TrainConfig(corpus=str(small_corpus), out=str(tmp_path / out), model="ViT-S-32", reg="ot-pairwise",
                          steps=2, eval_every=2, batch_size=8, unpaired_batch_size=8, val_size=8,
                          save_checkpoints=False)
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        return trainer

    cached = run("cached")
    assert cached.pair_img.dtype == torch.float32 and cached.pair_img.shape[1:] == cached.pair_txt.shape[1:] == (384,)
    from otclip.training.feature_cache import default_cache_dir

    for side in ("images", "texts"):  # on disk for the next run
        assert (default_cache_dir() / cached.trainable.feature_key(side) / f"{side}.json").exists()

    class TowersEveryStep(TrainableModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.cache_images = self.cache_texts = False

    monkeypatch.setattr(trainer_module, "TrainableModel", TowersEveryStep)
    every_step = run("every-step")
    assert every_step.pair_img.dtype == torch.uint8
    for name in ("visual.proj", "text_projection", "logit_scale"):
        a = dict(cached.loaded.model.named_parameters())[name]
        b = dict(every_step.loaded.model.named_parameters())[name]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    untrained = load_model("ViT-S-32").model.visual.proj
    assert not torch.allclose(cached.loaded.model.visual.proj, untrained)

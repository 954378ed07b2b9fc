import numpy as np
import pytest
import torch

from otclip.engine import Encoder, ModelLoadError, load_model, save_checkpoint
from otclip.engine.effnet_minilm import EMBED_DIM


def test_default_model_loads_offline_with_identity(default_model):
    assert default_model.identity.name == "effnet-minilm"
    assert len(default_model.identity.checksum) == 64
    assert default_model.embed_dim == EMBED_DIM
    tokens = default_model.tokenizer(["a cat"])
    assert tokens.shape[0] == 1
    assert hasattr(default_model.model, "encode_image") and hasattr(default_model.model, "encode_text")


def test_default_model_is_an_open_clip_custom_text_clip(default_model):
    from open_clip.model import CustomTextCLIP

    assert isinstance(default_model.model, CustomTextCLIP)
    trainable = [n for n, p in default_model.model.named_parameters() if p.requires_grad]
    assert any(n.startswith("visual.proj") for n in trainable) and any(n.startswith("text.proj") for n in trainable)


def test_open_clip_architecture_with_random_weights_loads_reproducibly():
    a = load_model("RN50", device="cpu")
    b = load_model("RN50", device="cpu")
    assert a.identity.checksum == b.identity.checksum
    assert a.embed_dim == 1024
    emb = Encoder(a).encode_texts(["a dog"])
    assert emb.shape == (1, 1024)


def test_unreachable_pretrained_tag_fails_in_one_line():
    with pytest.raises(ModelLoadError) as info:
        load_model("RN50:openai", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "RN50:openai" in message and "RN50:/path/to/" in message


def test_unknown_model_name_is_explained():
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model", device="cpu")


def test_non_otclip_file_is_refused_with_the_alternative(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"something": torch.zeros(2)}, path)
    with pytest.raises(ModelLoadError, match="ARCH:"):
        load_model(str(path))


def test_checkpoint_round_trip(default_model, encoder, tmp_path):
    path = save_checkpoint(default_model, tmp_path / "ckpt.pt")
    reloaded = load_model(str(path), device="cpu")
    assert reloaded.identity.name == "effnet-minilm@ckpt.pt"
    assert reloaded.identity.checksum != default_model.identity.checksum
    texts = ["a red car", "a cup of coffee"]
    np.testing.assert_allclose(Encoder(reloaded).encode_texts(texts), encoder.encode_texts(texts), atol=1e-6)
    from otclip.engine.sample_photos import sample_photo

    img = sample_photo("coffee")
    np.testing.assert_allclose(Encoder(reloaded).encode_image(img), encoder.encode_image(img), atol=1e-5)


def test_class_prompts_run_at_their_own_length_as_if_padded(default_model):
    """The default model's class prompts are encoded in batches of similar length, each cut to its longest
    row: every vector equals MiniLM's on the same ids padded to the context length (and put back in the
    prompts' order, here with batches of 7 over prompts of mixed lengths)."""
    import torch.nn.functional as F

    from otclip.engine.effnet_minilm import embed_by_length
    from otclip.engine.imagenet_classes import class_prompts, imagenet_class_synonyms

    text = default_model.model.text
    prompts = [p for syns in imagenet_class_synonyms()[::40] for p in class_prompts(syns)]
    ids = default_model.tokenizer(prompts)
    lengths = (ids != text.config.pad_token_id).sum(dim=1)
    assert lengths.max() > 2 * lengths.min() and lengths.max() < ids.shape[1]  # mixed, all shorter than padded
    with torch.no_grad():
        padded = F.normalize(text(ids), dim=-1)
    got = embed_by_length(text, ids, text.config.pad_token_id, "test", batch=7)
    assert (got - padded).abs().max() < 1e-5


def test_a_missing_weights_path_is_named_as_a_missing_file(tmp_path, monkeypatch):
    """A checkpoint path that does not exist was 'unknown model' (and ARCH:/missing/weights 'no network?'): wrong
    advice for a path given relative to another folder."""
    monkeypatch.chdir(tmp_path)
    for spec, missing in (("run/best.pt", "run/best.pt"), ("best.pt", "best.pt"),
                          ("ViT-B-32:/nowhere/w.safetensors", "/nowhere/w.safetensors"), ("RN50:w.bin", "w.bin")):
        with pytest.raises(ModelLoadError) as info:
            load_model(spec, device="cpu")
        assert "no such file" in str(info.value) and missing in str(info.value) and str(tmp_path) in str(info.value)


def test_specs_naming_files_are_made_absolute_from_the_folder_or_a_base(tmp_path, monkeypatch):
    from otclip.engine.model_memo import normal_spec

    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "run").mkdir()
    (tmp_path / "here" / "run" / "best.pt").write_bytes(b"x")
    (tmp_path / "here" / "w.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "here")
    here = tmp_path.resolve() / "here"
    assert normal_spec("run/best.pt") == str(here / "run" / "best.pt")
    assert normal_spec("ViT-B-32:w.safetensors") == f"ViT-B-32:{here / 'w.safetensors'}"
    for spec in ("effnet-minilm", "ViT-B-32", "ViT-B-32:laion2b_s34b_b79k", "hf-hub:org/run", "other/best.pt"):
        assert normal_spec(spec) == spec
    monkeypatch.chdir(tmp_path)  # elsewhere: found only from the base folder given
    assert normal_spec("run/best.pt") == "run/best.pt"
    assert normal_spec("run/best.pt", base=here) == str(here / "run" / "best.pt")
    assert normal_spec("ViT-B-32:w.safetensors", base=here) == f"ViT-B-32:{here / 'w.safetensors'}"

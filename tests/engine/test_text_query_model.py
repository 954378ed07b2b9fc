"""Text queries without torch: the exported text tower and its tokenizer agree with the torch model's,
`otclip search` answers through them without importing torch, and a stale or unfaithful export is not used."""

import json
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from otclip.engine.index_directory import IndexDirectory
from otclip.engine.model_identity import ModelIdentity
from otclip.engine.text_query_export import export_text_query_model, query_tokenizer
from tests.torch_free import search_json_without_torch


def _texts(seed: int = 0, n: int = 300) -> list[str]:
    """Texts unlike the export's probes: captions, and random strings over Latin, Greek, Cyrillic, CJK,
    emoji, digits, punctuation, HTML entities and whitespace runs, some beyond the context length."""
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéèüßçñΩαβγЖжЯ日本語の写真🙂🚀0123456789"
                ".,;:!?'\"-()[]/&%$#@ ")
    out = ["a photo of a cat", "A Rocket on the launch pad!", "two dogs playing in the snow", "&lt;b&gt;bold&lt;/b&gt;",
           "don't   stop\tme\nnow", "Ⅻ ﬁ ½ full-width ＡＢＣ", "ü" * 90]
    for _ in range(n):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 30))]
        out.append(rng.choice([" ", "  ", "\t"]).join(words))
    return out


def test_the_clip_bpe_tokenizer_matches_open_clips():
    """open_clip's SimpleTokenizer (ViT-B-32 and most architectures) rebuilt for `tokenizers`: same ids."""
    import open_clip

    stub = SimpleNamespace(tokenizer=open_clip.get_tokenizer("ViT-B-32"), identity=ModelIdentity("stub", "0" * 64))
    tokenize, info = query_tokenizer(stub)
    assert info["clean"] == "lower" and info["context_length"] == 77
    texts = _texts()
    np.testing.assert_array_equal(tokenize(texts), stub.tokenizer(texts).numpy())


def test_the_default_models_tokenizer_matches(default_model):
    tokenize, info = query_tokenizer(default_model)
    assert info["clean"] == "whitespace"
    texts = _texts(seed=1)
    np.testing.assert_array_equal(tokenize(texts), default_model.tokenizer(texts).numpy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_model):
    directory = IndexDirectory(tmp_path_factory.mktemp("export") / "index")
    directory.open_for_model("effnet-minilm", default_model.identity, default_model.embed_dim)
    assert export_text_query_model(default_model, directory) is None
    return directory


def test_the_export_embeds_like_the_torch_model(exported, encoder):
    from otclip.engine.text_query_model import TextQueryModel

    files, info = exported.query_model_files("text")
    assert info["max_abs_error"] <= 1e-4
    texts = _texts(seed=2, n=60)
    got = TextQueryModel(files["text.onnx"], files["tokenizer.json"], info, threads=1).encode_texts(texts)
    want = encoder.encode_texts(texts)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


def test_an_export_of_another_model_is_not_used(exported, tmp_path):
    copy = IndexDirectory(tmp_path / "index")
    shutil.copytree(exported.root, copy.root)
    info = json.loads((copy.query_dir / "text.json").read_text())
    (copy.query_dir / "text.json").write_text(json.dumps({**info, "model_checksum": "f" * 64}))
    assert copy.query_model_files("text") is None
    (copy.query_dir / "text.json").write_text(json.dumps(info))
    assert copy.query_model_files("text") is not None
    with open(copy.query_dir / "text.onnx.data", "r+b") as f:  # weights cut short, as by a crash while copying
        f.truncate(1000)
    assert copy.query_model_files("text") is None


def test_an_unfaithful_tokenizer_is_not_kept(default_model, tmp_path, monkeypatch):
    from otclip.engine import text_query_model

    directory = IndexDirectory(tmp_path / "index")
    directory.open_for_model("effnet-minilm", default_model.identity, default_model.embed_dim)
    monkeypatch.setitem(text_query_model.CLEANERS, "whitespace", lambda text: text)  # HTML entities left escaped
    reason = export_text_query_model(default_model, directory)
    assert reason is not None and "tokenizer disagrees" in reason
    assert directory.query_model_files("text") is None


def test_cli_search_answers_without_torch(demo_index, default_model):
    from otclip.engine.search import IndexSearcher

    index = demo_index / "index"
    assert IndexDirectory(index).query_model_files("text") is not None  # `otclip index` kept the export
    results = search_json_without_torch("search", str(index), "a cup of coffee", "-k", "5")
    expected = IndexSearcher(index, model=default_model).search_text("a cup of coffee", k=5)
    assert [r["path"] for r in results] == [r.path for r in expected]
    np.testing.assert_allclose([r["score"] for r in results], [r.score for r in expected], atol=1e-4)



def test_queries_are_padded_only_to_their_longest_text(exported, encoder):
    """The default model's MiniLM masks padding, so its export is kept trimmed: "a cat" runs as 4 tokens, not 77,
    and corpora are batched by length; the vectors are still the torch model's on ids padded to 77."""
    from otclip.engine.text_query_model import TextQueryModel

    files, info = exported.query_model_files("text")
    assert info["trim"] is True
    model = TextQueryModel(files["text.onnx"], files["tokenizer.json"], info, threads=1)
    assert model.tokenize(["a cat"]).shape == (1, 4)
    assert model.tokenize(["a cat", "a photo of a cat on a mat"]).shape[1] < 77
    texts = _texts(seed=3, n=60)
    want = encoder.encode_texts(texts)
    for batch_size in (1, 7, None):  # alone, in batches of similar length (put back in order), all at once
        got = model.encode_texts(texts, batch_size=batch_size)
        assert np.abs(got - want).max() < 1e-4, batch_size


def test_a_tower_that_needs_every_position_keeps_the_full_length(tmp_path, capfd):
    """open_clip's own text transformer adds all 77 positional embeddings: its export is kept untrimmed
    (trimmed ids do not even run) and still embeds as the torch model does. The refused probe prints nothing:
    ONNX Runtime's own log of the failed run landed on the user's terminal at every first index of a model."""
    import open_clip
    import torch

    from otclip.engine.model_loading import LoadedModel
    from otclip.engine.text_query_model import TextQueryModel

    torch.manual_seed(0)
    model = open_clip.CLIP(16, open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                           open_clip.model.CLIPTextCfg(width=32, heads=2, layers=2)).eval()
    loaded = LoadedModel(model, open_clip.get_tokenizer("ViT-B-32"), lambda image: None, ModelIdentity("tiny", "1" * 64), 16)
    directory = IndexDirectory(tmp_path / "index")
    directory.open_for_model("tiny", loaded.identity, loaded.embed_dim)
    capfd.readouterr()
    assert export_text_query_model(loaded, directory) is None
    assert "onnxruntime" not in capfd.readouterr().err
    files, info = directory.query_model_files("text")
    assert info["trim"] is False
    exported = TextQueryModel(files["text.onnx"], files["tokenizer.json"], info, threads=1)
    assert exported.tokenize(["a cat"]).shape == (1, 77)
    texts = _texts(seed=4, n=20)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(loaded.tokenizer(texts)), dim=-1).numpy()
    assert np.abs(exported.encode_texts(texts, batch_size=6) - want).max() < 1e-4

"""Image queries without torch: the Pillow/numpy preprocessing is torchvision's (checked against torchvision
itself), the exported image tower embeds like the torch encoder, `otclip search --image` answers without
importing torch, and a model whose preprocessing has no torch-free form is refused once, with the reason."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from otclip.engine.image_query_export import export_image_query_model, preprocess_spec
from otclip.engine.image_query_model import ImageQueryModel, preprocess
from otclip.engine.index_directory import IndexDirectory
from tests.torch_free import search_json_without_torch

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _random_image(rng, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("resize,crop,interpolation", [
    (224, 224, T.InterpolationMode.BICUBIC), (256, 256, T.InterpolationMode.BICUBIC),
    (240, 224, T.InterpolationMode.BILINEAR), ((200, 300), (180, 260), T.InterpolationMode.BICUBIC),
    (100, 160, T.InterpolationMode.NEAREST),  # a crop larger than the resized image: zero padding
])
def test_preprocessing_is_torchvisions(resize, crop, interpolation):
    pipeline = T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(crop), T.ToTensor(),
                          T.Normalize(MEAN, STD)])
    spec = preprocess_spec(SimpleNamespace(preprocess=pipeline, image_size=224))
    rng = np.random.default_rng(0)
    for width, height in [(640, 480), (480, 640), (224, 224), (37, 23), (1001, 333), (256, 257), (300, 200)]:
        image = _random_image(rng, width, height)
        np.testing.assert_allclose(preprocess(image, spec), pipeline(image).numpy(), rtol=0, atol=1e-6)


def test_other_preprocessing_is_refused():
    for pipeline in (T.Compose([T.RandomResizedCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]),
                     T.Compose([T.Resize(224, max_size=300), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])):
        reason = preprocess_spec(SimpleNamespace(preprocess=pipeline, image_size=224))
        assert isinstance(reason, str) and "no torch-free equivalent" in reason


def test_the_export_embeds_like_the_torch_encoder(default_model, encoder, tmp_path):
    from otclip.engine.sample_photos import write_sample_photos

    directory = IndexDirectory(tmp_path / "index")
    directory.open_for_model("effnet-minilm", default_model.identity, default_model.embed_dim)
    assert export_image_query_model(default_model, directory) is None
    files, info = directory.query_model_files("image")
    assert info["max_abs_error"] <= 1e-4 and info["max_pixel_error"] <= 1e-5
    photos = write_sample_photos(tmp_path / "photos")  # JPEGs (draft-decoded) and PNGs of many sizes
    got = ImageQueryModel(files["image.onnx"], info, threads=1).encode_images(photos)
    np.testing.assert_allclose(got, encoder.encode_images(photos), rtol=0, atol=1e-4)
    with open(files["image.onnx.data"], "r+b") as f:  # weights cut short: never used
        f.truncate(1000)
    assert directory.query_model_files("image") is None


def test_a_refused_export_is_recorded_and_not_retried(default_model, tmp_path, monkeypatch):
    from otclip.engine.sample_photos import write_sample_photos
    from otclip.indexer.pipeline import index_images

    photos = write_sample_photos(tmp_path / "photos")[0].parent
    monkeypatch.setenv("OTCLIP_CACHE_DIR", str(tmp_path / "cache"))  # no export of this model cached yet
    monkeypatch.setattr(default_model, "preprocess", T.Compose([T.RandomResizedCrop(224), T.ToTensor()]))
    first = index_images(photos, tmp_path / "ix", default_model, progress=False, workers=0)
    assert "image queries load torch (preprocessing" in first.line()
    directory = IndexDirectory(tmp_path / "ix")
    assert directory.query_model_files("image") is None and directory.query_model_files("text") is not None
    again = index_images(photos, tmp_path / "ix", "effnet-minilm", progress=False, workers=0)
    assert not again.model_loaded and "image queries load torch (preprocessing" in again.line()


def test_cli_image_search_answers_without_torch(demo_index, default_model):
    from otclip.engine.search import IndexSearcher

    index = demo_index / "index"
    photo = next((demo_index / "data").rglob("rocket.jpg"))
    results = search_json_without_torch("search", str(index), "--image", str(photo), "-k", "5")
    expected = IndexSearcher(index, model=default_model).search_image(str(photo), k=5)
    assert [r["path"] for r in results] == [r.path for r in expected]
    np.testing.assert_allclose([r["score"] for r in results], [r.score for r in expected], atol=1e-4)


def test_a_second_index_of_the_model_links_the_cached_exports(default_model, tmp_path, monkeypatch):
    from otclip.engine.cache_dir import cache_dir
    from otclip.engine.sample_photos import write_sample_photos
    from otclip.indexer.pipeline import index_images, index_texts

    fresh = tmp_path / "cache"  # no exports yet; the default model's class embeddings (20 s on a core) kept
    fresh.mkdir()
    for kept in cache_dir().glob("imagenet-class-embeddings-*.npy"):
        shutil.copy(kept, fresh / kept.name)
    monkeypatch.setenv("OTCLIP_CACHE_DIR", str(fresh))
    photos = write_sample_photos(tmp_path / "photos")[0].parent
    index_images(photos, tmp_path / "first", default_model, progress=False, workers=0)
    texts = tmp_path / "captions.txt"
    texts.write_text("a cat\na rocket\n")
    summary = index_texts(texts, tmp_path / "second", "effnet-minilm", progress=False)
    assert summary.model_loaded  # two new texts to embed; the exports themselves came from the cache
    for tower in ("text", "image"):
        first, _ = IndexDirectory(tmp_path / "first").query_model_files(tower)
        second, _ = IndexDirectory(tmp_path / "second").query_model_files(tower)
        for name, path in second.items():  # the same file, linked: no second copy on disk
            assert path.stat().st_ino == first[name].stat().st_ino and path.stat().st_nlink == 3

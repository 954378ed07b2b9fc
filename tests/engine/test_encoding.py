import numpy as np
import pytest
import torch

from otclip.engine import ImageDecodeError, select_device
from otclip.engine.sample_photos import SAMPLE_PHOTOS, sample_photo, write_sample_photos


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory):
    return write_sample_photos(tmp_path_factory.mktemp("photos"))


def test_text_embeddings_are_normalised_float32(encoder):
    emb = encoder.encode_texts(["a cat", "a dog", ""])
    assert emb.dtype == np.float32 and emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_image_embeddings_are_normalised_float32(encoder, photo_paths):
    emb = encoder.encode_images(photo_paths[:5])
    assert emb.dtype == np.float32 and emb.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_same_vectors_across_batch_sizes_and_workers(encoder, photo_paths):
    paths = photo_paths[:9]
    a = encoder.encode_images(paths, batch_size=9, num_workers=0)
    b = encoder.encode_images(paths, batch_size=2, num_workers=1)
    np.testing.assert_allclose(a, b, atol=1e-5)
    texts = [p.caption for p in SAMPLE_PHOTOS]
    np.testing.assert_allclose(encoder.encode_texts(texts, batch_size=32), encoder.encode_texts(texts, batch_size=3),
                               atol=1e-5)


def test_paths_and_pil_images_agree(encoder, photo_paths):
    from PIL import Image

    from_path = encoder.encode_images(photo_paths[:2])
    from_pil = encoder.encode_images([Image.open(p) for p in photo_paths[:2]])
    np.testing.assert_allclose(from_path, from_pil, atol=1e-5)


def test_bad_image_names_the_input(encoder, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        encoder.encode_images([sample_photo("coffee"), bad])


def test_batches_report_failures_in_order(encoder, photo_paths, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    items = [photo_paths[0], bad, photo_paths[1], photo_paths[2]]
    batches = list(encoder.iter_image_batches(items, batch_size=2, num_workers=1))
    assert [i for b in batches for i in b.indices] == [0, 2, 3]
    assert [f[0] for b in batches for f in b.failures] == [1]


def test_on_the_cpu_batches_are_decoded_between_forward_passes_as_workers_decode_them(default_model, photo_paths,
                                                                                    tmp_path, monkeypatch):
    """The default on a CPU device: threads decode each batch, then the model encodes it (no DataLoader, no
    worker process); vectors, failures, sizes, display copies and times as the worker processes give them."""
    from otclip.engine import Encoder, encoding

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"nope")
    items = [photo_paths[0], bad, *photo_paths[1:6]]
    with_workers = list(Encoder(default_model, batch_size=3, num_workers=1).iter_image_batches(items, thumbnails=True))

    def no_loader(*args, **kwargs):
        raise AssertionError("a DataLoader was made")

    monkeypatch.setattr(encoding, "DataLoader", no_loader)
    between = list(Encoder(default_model, batch_size=3).iter_image_batches(items, thumbnails=True))
    for a, b in zip(between, with_workers, strict=True):
        assert (a.indices, a.failures, a.sizes, a.thumbnails, a.taken) == (b.indices, b.failures, b.sizes,
                                                                        b.thumbnails, b.taken)
        np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    assert [f[0] for b in between for f in b.failures] == [1]


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_encoding_matches_cpu(default_model, encoder):
    from otclip.engine import Encoder, load_model

    gpu = Encoder(load_model("effnet-minilm", device="cuda"))
    img = sample_photo("chelsea")
    cpu_emb, gpu_emb = encoder.encode_image(img), gpu.encode_image(img)
    assert float(cpu_emb @ gpu_emb) > 0.99  # bf16 autocast on CUDA: close, not bit-equal


def test_on_the_cpu_the_model_takes_a_batch_in_sub_batches_in_order(default_model, photo_paths, monkeypatch):
    """`Encoder.forward`: a 19-image (and a 19-text) batch reaches the model as calls of at most CPU_FORWARD_ROWS
    rows, and the vectors, in input order, are those of one call of the model on the whole batch."""
    import torch.nn.functional as F

    from otclip.engine import Encoder, encoding
    from otclip.engine.images import load_image

    model, paths = default_model.model, [photo_paths[i % len(photo_paths)] for i in range(19)]
    texts = [f"{SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)].caption} {i}" for i in range(19)]
    with torch.no_grad():
        pixels = torch.stack([default_model.preprocess(load_image(p, draft=default_model.image_size)) for p in paths])
        whole_images = F.normalize(model.encode_image(pixels), dim=-1).numpy()
        whole_texts = F.normalize(model.encode_text(default_model.tokenizer(texts)), dim=-1).numpy()
    calls = []
    for name in ("encode_image", "encode_text"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda x, original=original: calls.append(len(x)) or original(x))
    encoder = Encoder(default_model, batch_size=19)
    np.testing.assert_allclose(encoder.encode_images(paths), whole_images, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), whole_texts, atol=1e-5)
    rows = encoding.CPU_FORWARD_ROWS
    assert calls == [rows, rows, 19 - 2 * rows] * 2

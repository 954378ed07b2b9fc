"""JPEGs decoded and resized on the model's device (`engine/device_decoding.py`). The path is the same on the CPU
(torchvision's libjpeg) as on a GPU (nvJPEG), so it is tested here against PIL, the CPU pipeline's decoder; the
CUDA run is compared with this one in test_gpu.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from otclip.engine import Encoder
from otclip.engine.device_decoding import _oriented, read_for_device
from otclip.engine.images import load_image, taken_time
from otclip.engine.sample_photos import write_sample_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_sample_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def on_device(default_model):
    return Encoder(default_model, batch_size=4, num_workers=1, device_decoding=True)


def _jpeg(array: np.ndarray, orientation: int = 1, when: str | None = None, mode: str = "RGB") -> bytes:
    image = Image.fromarray(array).convert(mode)
    exif = image.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    if when:
        exif[0x0132] = when
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_orientation_matches_pil_exif_transpose():
    """Every EXIF orientation, on an asymmetric image: the decoded, re-oriented tensor shows what PIL shows."""
    from torchvision.io import ImageReadMode, decode_jpeg

    rng = np.random.default_rng(0)
    array = np.kron(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))  # blocks: JPEG-stable
    for orientation in range(1, 9):
        data = _jpeg(array, orientation)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), np.int16)
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        got = _oriented(decoded, orientation).permute(1, 2, 0).numpy().astype(np.int16)
        assert got.shape == expected.shape, orientation
        assert np.abs(got - expected).mean() < 1.0, orientation


def test_embeddings_sizes_and_times_match_the_cpu_decode(default_model, on_device, photos, tmp_path):
    """Sample photos, rotated ones and a greyscale one: vectors within bf16-free float tolerance of PIL's full
    decode through the model's own preprocessing, sizes as PIL shows the oriented photo, EXIF times kept."""
    rng = np.random.default_rng(1)
    array = np.asarray(Image.open(photos[2]).convert("RGB"))
    extra = []
    for orientation in (3, 6, 8):
        path = tmp_path / f"turned{orientation}.jpg"
        path.write_bytes(_jpeg(array, orientation, when="2021:06:01 12:30:00"))
        extra.append(path)
    grey = tmp_path / "grey.jpg"
    grey.write_bytes(_jpeg(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8), mode="L"))
    items = [*photos[:9], *extra, grey]

    cpu = Encoder(default_model, batch_size=4, num_workers=0)
    reference = cpu.encode_images([load_image(p) for p in items])  # no draft: the full decode
    batches = list(on_device.iter_image_batches(items, thumbnails=True))
    got = np.concatenate([b.embeddings for b in batches])
    assert [i for b in batches for i in b.indices] == list(range(len(items)))
    assert np.min(np.sum(got * reference, axis=1)) > 0.98
    expected_sizes = [ImageOps.exif_transpose(Image.open(p)).size for p in items]
    assert [s for b in batches for s in b.sizes] == expected_sizes
    assert expected_sizes[len(photos[:9]) + 1] == array.shape[:2]  # orientation 6: portrait from a landscape file
    taken = [t for b in batches for t in b.taken]
    assert taken == [taken_time(Image.open(p)) for p in items] and taken[9] is not None
    for b in batches:
        for size, copy in zip(b.sizes, b.thumbnails):
            thumb = Image.open(io.BytesIO(copy))
            assert thumb.format == "JPEG" and max(thumb.size) == min(384, max(size))
            assert abs(thumb.size[0] / thumb.size[1] - size[0] / size[1]) < 0.02


def test_what_the_device_cannot_take_goes_through_the_cpu(default_model, on_device, photos, tmp_path):
    """PNG and CMYK JPEG are decoded on the CPU, a JPEG's bytes in memory on the device; a truncated JPEG (no end
    marker), a JPEG the device's decoder rejects (then the CPU's too), a non-image and a missing file are
    reported as the CPU path reports them; the survivors' vectors are the CPU path's (PNG, CMYK: the very
    same decode)."""
    png = tmp_path / "photo.png"
    Image.open(photos[0]).save(png)
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(photos[1]).convert("CMYK").save(cmyk, format="JPEG")
    whole = photos[3].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    scrambled = tmp_path / "bogus-huffman.jpg"  # a sound header and end marker; a table the decoder rejects
    body = bytearray(whole)
    at = body.index(b"\xff\xc4")  # DHT: marker, length (2), class/id (1), then 16 code counts
    body[at + 5 : at + 21] = b"\xff" * 16
    scrambled.write_bytes(bytes(body))
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    items = [png, truncated, cmyk, text, whole, tmp_path / "missing.jpg", scrambled, photos[4]]

    cpu = Encoder(default_model, batch_size=3, num_workers=0)
    expected = list(cpu.iter_image_batches(items))
    got = list(on_device.iter_image_batches(items, batch_size=3))
    ok = [i for b in expected for i in b.indices]
    assert [i for b in got for i in b.indices] == ok
    assert {i: r for b in got for i, r in b.failures} == {i: r for b in expected for i, r in b.failures}
    assert {i for b in got for i, _ in b.failures} == {1, 3, 5, 6}
    vectors = dict(zip([i for b in got for i in b.indices], np.concatenate([b.embeddings for b in got])))
    reference = dict(zip(ok, np.concatenate([b.embeddings for b in expected])))
    np.testing.assert_allclose(vectors[0], reference[0], atol=1e-5)  # PNG: the CPU decode itself
    np.testing.assert_allclose(vectors[2], reference[2], atol=1e-5)  # CMYK JPEG
    assert float(vectors[4] @ reference[4]) > 0.98  # JPEG bytes: on the device


def test_the_worker_defers_only_complete_jpegs(default_model, photos, tmp_path):
    from otclip.engine.device_decoding import EncodedJpeg

    preprocess = Encoder(default_model)._preprocess.cpu
    deferred = read_for_device(photos[0], preprocess, 224, False)
    assert isinstance(deferred.pixels, EncodedJpeg) and deferred.size == Image.open(photos[0]).size
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photos[0].read_bytes()[:-2])  # no end-of-image marker: the CPU decodes it (or says why not)
    on_cpu = read_for_device(cut, preprocess, 224, False)
    assert isinstance(on_cpu, str) or isinstance(on_cpu.pixels, torch.Tensor)
    big, edge = tmp_path / "big.jpg", tmp_path / "edge.jpg"  # shorter side 4 x 224 and over: draft-decoded by the worker
    Image.open(photos[0]).resize((1000, 4 * 224)).save(big, format="JPEG")
    Image.open(photos[0]).resize((1000, 4 * 224 - 1)).save(edge, format="JPEG")
    assert isinstance(read_for_device(big, preprocess, 224, False).pixels, torch.Tensor)
    assert isinstance(read_for_device(edge, preprocess, 224, False).pixels, EncodedJpeg)
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(photos[0]).convert("CMYK").save(cmyk, format="JPEG")
    assert isinstance(read_for_device(cmyk, preprocess, 224, False).pixels, torch.Tensor)


def test_device_decoding_refuses_a_preprocessing_it_cannot_run(default_model):
    from dataclasses import replace

    from torchvision import transforms as T

    odd = replace(default_model, preprocess=T.Compose([T.Grayscale(3), *default_model.preprocess.transforms]))
    with pytest.raises(ValueError, match="cannot run on the device"):
        Encoder(odd, device_decoding=True)
    assert Encoder(odd)._device_decoder is None


def test_a_raw_file_goes_to_the_cpu_decode_unread_by_the_worker(default_model, tmp_path, monkeypatch):
    """LibRaw reads a camera's RAW file itself: the worker does not read its bytes first (25-60 MB each)."""
    from pathlib import Path

    from raw_files import write_dng

    from otclip.engine.image_batches import decode_for_model

    preprocess = Encoder(default_model)._preprocess.cpu
    scene = np.zeros((256, 384, 3))
    scene[:, :192], scene[:, 192:] = [0.8, 0.4, 0.1], [0.1, 0.3, 0.8]
    dng = write_dng(tmp_path / "IMG_1.DNG", scene)
    expected = decode_for_model(dng, preprocess, 224, False)
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: pytest.fail(f"{p} read") if p == dng else read(p))
    decoded = read_for_device(dng, preprocess, 224, False)
    assert isinstance(decoded.pixels, torch.Tensor) and torch.equal(decoded.pixels, expected.pixels)
    assert decoded.size == expected.size == (384, 256)

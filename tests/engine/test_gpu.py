"""CUDA paths; skipped where no GPU exists (CI never has one)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_open_clip_encoding_on_cuda_matches_cpu():
    from otclip.engine import Encoder, load_model
    from otclip.engine.sample_photos import sample_photo

    cpu, gpu = load_model("ViT-B-32", device="cpu"), load_model("ViT-B-32", device="cuda")
    assert gpu.device.type == "cuda" and cpu.identity.checksum == gpu.identity.checksum
    images = [sample_photo(n) for n in ("chelsea", "coffee", "rocket")]
    a = Encoder(cpu).encode_images(images)
    b = Encoder(gpu).encode_images(images, batch_size=2)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    assert np.min(np.sum(a * b, axis=1)) > 0.99  # bf16 autocast: close to the float32 CPU vectors
    t = Encoder(gpu).encode_texts(["a cat", "a rocket"])
    np.testing.assert_allclose(t, Encoder(cpu).encode_texts(["a cat", "a rocket"]), atol=2e-2)


def test_sinkhorn_on_cuda_matches_cpu():
    from otclip.training.sinkhorn import cosine_cost, entropic_ot

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(512, 64, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(384, 64, generator=g), dim=1)
    cpu = entropic_ot(cosine_cost(x, y), eps=0.05, tol=1e-5)
    gpu = entropic_ot(cosine_cost(x.cuda(), y.cuda()), eps=0.05, tol=1e-5)
    assert torch.allclose(cpu.plan, gpu.plan.cpu(), atol=1e-6)


def test_nvjpeg_decoding_matches_the_cpu_decoders(tmp_path):
    """On a GPU, JPEGs are decoded there by default (nvJPEG); the vectors, sizes and failures are the CPU's."""
    from otclip.engine import Encoder, load_model
    from otclip.engine.sample_photos import write_sample_photos

    photos = write_sample_photos(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(photos[0].read_bytes()[:500])
    items = [*photos, bad]
    cpu, gpu = load_model("ViT-B-32", device="cpu"), load_model("ViT-B-32", device="cuda")
    on_gpu = Encoder(gpu, batch_size=8)
    assert on_gpu._device_decoder is not None
    got = list(on_gpu.iter_image_batches(items, thumbnails=True))
    plain = list(Encoder(cpu, batch_size=8, num_workers=0).iter_image_batches(items))
    libjpeg = list(Encoder(cpu, batch_size=8, num_workers=0, device_decoding=True).iter_image_batches(items))
    failures = [f for b in got for f in b.failures]
    assert failures == [f for b in plain for f in b.failures] and [i for i, _ in failures] == [len(photos)]
    assert [s for b in got for s in b.sizes] == [s for b in libjpeg for s in b.sizes]
    a, b, c = (np.concatenate([x.embeddings for x in r]) for r in (got, libjpeg, plain))
    assert np.min(np.sum(a * b, axis=1)) > 0.99  # nvJPEG vs libjpeg, bf16 autocast
    assert np.min(np.sum(a * c, axis=1)) > 0.95  # vs PIL's draft decode
    assert all(len(t) > 100 for r in got for t in r.thumbnails)

"""The default model is aligned out of the box: real photos, real captions, no paired training."""

import numpy as np
import pytest

from otclip.engine import fashion_mnist
from otclip.engine.metrics import recall_at_k, zero_shot_accuracy
from otclip.engine.sample_photos import SAMPLE_PHOTOS, sample_photo


def test_sample_photos_retrieve_their_captions(encoder):
    images = encoder.encode_images([sample_photo(p.name) for p in SAMPLE_PHOTOS])
    texts = encoder.encode_texts([p.caption for p in SAMPLE_PHOTOS])
    scores = texts @ images.T
    relevant = np.eye(len(SAMPLE_PHOTOS), dtype=bool)
    t2i, i2t = recall_at_k(scores, relevant), recall_at_k(scores.T, relevant)
    print(f"sample photos ({len(SAMPLE_PHOTOS)}): text->image {t2i}, image->text {i2t}")
    assert t2i["R@1"] >= 0.7
    assert i2t["R@1"] >= 0.4


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist.available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_zero_shot(encoder):
    images, labels = fashion_mnist.load_split("test")
    images, labels = images[:500], labels[:500]
    emb = encoder.encode_images([fashion_mnist.to_photo(a) for a in images], batch_size=64)
    classes = encoder.encode_texts(fashion_mnist.class_prompts())
    accuracy = zero_shot_accuracy(emb, classes, labels)
    print(f"Fashion-MNIST zero-shot accuracy on 500 test images: {accuracy:.3f} (chance 0.10)")
    assert accuracy >= 0.25

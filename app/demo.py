"""`make demo`: build (or update) the sample index from real images that ship in packages, then serve."""

from __future__ import annotations

import json
from pathlib import Path

from otclip.engine import fashion_mnist
from otclip.engine.errors import IndexDirectoryError
from otclip.engine.flag_values import check_at_least
from otclip.engine.index_directory import IndexDirectory
from otclip.engine.model_identity import DEFAULT_MODEL_NAME
from otclip.engine.prompts import class_prompt, with_article
from otclip.engine.sample_photos import SAMPLE_PHOTOS, write_sample_photos

DEMO_MANIFEST = "gallery.jsonl"  # in --data, beside the photos: the source the demo index mirrors


def write_demo_corpus(data_dir: Path, fashion_mnist_count: int = 300) -> tuple[Path, Path]:
    """The sample photos (+ a Fashion-MNIST test subset when installed) as an image manifest with
    captions, and a caption corpus for the text side. Returns (manifest, captions)."""
    check_at_least("--fashion-mnist", fashion_mnist_count, 0)
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo, path in zip(SAMPLE_PHOTOS, write_sample_photos(data_dir / "photos")):
        rows.append({"path": str(path.relative_to(data_dir)), "caption": photo.caption, "label": photo.name,
                     "source": "scikit-image" if photo.name not in ("china", "flower") else "scikit-learn"})
    texts = [p.caption for p in SAMPLE_PHOTOS]
    if fashion_mnist_count and fashion_mnist.available():
        images, labels = fashion_mnist.load_split("test")
        folder = data_dir / "fashion-mnist"
        folder.mkdir(exist_ok=True)
        for i in range(fashion_mnist_count):
            path = folder / f"test-{i:05d}.png"
            if not path.exists():
                fashion_mnist.to_photo(images[i]).save(path)
            name = fashion_mnist.SHORT_NAMES[labels[i]]
            rows.append({"path": str(path.relative_to(data_dir)), "caption": with_article(name), "label": name,
                         "source": "Fashion-MNIST"})
        texts += [class_prompt(name) for name in fashion_mnist.SHORT_NAMES]
    manifest = data_dir / DEMO_MANIFEST
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    captions = data_dir / "captions.txt"
    captions.write_text("".join(t + "\n" for t in texts))
    return manifest, captions


def _refuse_other_data(index_dir: Path, data_dir: Path) -> None:
    """A demo index built from another --data folder is refused before anything is written: the index mirrors one
    source, so indexing the new copy would be refused (or, replaced, take the first copy's photos out), after its
    photos had been written."""
    kept = IndexDirectory(index_dir).kept_source()
    if kept is not None and kept != str((data_dir / DEMO_MANIFEST).resolve()):
        raise IndexDirectoryError(f"{index_dir}: a demo index of the photos in {Path(kept).parent}, not {data_dir}; "
                                  f"give --data {Path(kept).parent}, or another --out for a new demo index")


def build_demo_index(index_dir: Path, data_dir: Path, fashion_mnist_count: int = 300, model: str = DEFAULT_MODEL_NAME,
                     progress: bool = True) -> list[str]:
    """Index the demo corpus (incrementally: a second run embeds nothing new). Returns summary lines."""
    from otclip.indexer.pipeline import index_images, index_texts

    _refuse_other_data(index_dir, data_dir)
    manifest, captions = write_demo_corpus(data_dir, fashion_mnist_count)
    return [index_images(manifest, index_dir, model, progress=progress).line(),
            index_texts(captions, index_dir, progress=progress).line()]

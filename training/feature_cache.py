"""On-disk cache of frozen-tower features, keyed by the frozen extractor and each item's content
(sha256 of the image file, or of the text). Runs that share a model never recompute a feature.

Several processes share it (torchrun ranks, the experiment's runs side by side): a side's features are
read, completed and written under one file lock, so that no process pairs one writer's rows with another's
array, or reads a generation another has just deleted; a process that waited finds the features computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from otclip.engine import Encoder
from otclip.engine.atomic_files import remove_dead_writers_files, write_json_atomically, write_npy_atomically
from otclip.engine.cache_dir import cache_dir
from otclip.engine.checksums import sha256_file
from otclip.engine.image_batches import refuse_failures

from .trainable import TrainableModel


def default_cache_dir() -> Path:
    return cache_dir() / "features"


class FeatureCache:
    def __init__(self, trainable: TrainableModel, cache_dir: Path | None = None, batch_size: int = 64,
                 workers: int | None = None, progress: bool = True) -> None:
        self.trainable = trainable
        self.root = cache_dir or default_cache_dir()
        self.encoder = Encoder(trainable.loaded, batch_size=batch_size, num_workers=workers)
        self.progress = progress

    @contextmanager
    def _locked(self, side: str) -> Iterator[Path]:
        """The side's folder, held under its lock."""
        folder = self.root / self.trainable.feature_key(side)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / f"{side}.lock"):
            remove_dead_writers_files(folder)  # a killed process's half-written generation
            yield folder

    @staticmethod
    def _load(folder: Path, side: str) -> tuple[dict[str, int], np.ndarray | None]:
        index_path = folder / f"{side}.json"
        if not index_path.exists():
            return {}, None
        index = json.loads(index_path.read_text())
        return index["rows"], np.load(folder / f"{side}-{index['generation']}.npy")

    def _store(self, folder: Path, side: str, rows: dict[str, int], array: np.ndarray) -> None:
        old = json.loads((folder / f"{side}.json").read_text())["generation"] if (folder / f"{side}.json").exists() else 0
        write_npy_atomically(folder / f"{side}-{old + 1}.npy", array)
        write_json_atomically(folder / f"{side}.json", {"generation": old + 1, "rows": rows})
        (folder / f"{side}-{old}.npy").unlink(missing_ok=True)

    def images(self, paths: list[str], failures: list[tuple[int, str]] | None = None) -> torch.Tensor:
        """(n, f) frozen image features, computed for the images not cached yet. An image that cannot be read:
        ImageDecodeError (a ValueError) naming the first, or, given `failures`, left out (the rows are the readable
        images', in order) and recorded there as (index, reason); it is not cached, so a repaired file is read the
        next time."""
        if not self.trainable.cache_images:
            raise RuntimeError("image features are not cacheable with an unlocked image tower")
        digests = [sha256_file(p) for p in paths]
        with self._locked("images") as folder:
            return self._images(folder, paths, digests, failures)

    def _images(self, folder: Path, paths: list[str], digests: list[str],
                failures: list[tuple[int, str]] | None) -> torch.Tensor:
        rows, array = self._load(folder, "images")
        missing = sorted({d: p for d, p in zip(digests, paths) if d not in rows}.items())
        unreadable: dict[str, str] = {}
        if missing:
            new_rows, parts = dict(rows), [array] if array is not None else []
            missing_paths = [p for _, p in missing]
            batches = self.encoder.iter_image_batches(missing_paths, encode=self.trainable.image_features,
                                                      normalize=False, progress=self.progress)
            offset = 0 if array is None else len(array)
            for batch in batches:
                if failures is None:
                    refuse_failures(batch, missing_paths)
                unreadable.update((missing[i][0], reason) for i, reason in batch.failures)
                for j, i in enumerate(batch.indices):
                    new_rows[missing[i][0]] = offset + j
                offset += len(batch.indices)
                if batch.indices:
                    parts.append(batch.embeddings)
            if len(new_rows) > len(rows):
                array, rows = np.concatenate(parts), new_rows
                self._store(folder, "images", rows, array)
        if failures is not None:
            failures.extend((k, unreadable[d]) for k, d in enumerate(digests) if d in unreadable)
        readable = [rows[d] for d in digests if d not in unreadable]
        return torch.from_numpy(np.ascontiguousarray(array[readable])) if readable else torch.zeros((0, 0))

    def texts(self, texts: list[str]) -> torch.Tensor:
        """(n, f) frozen text features (pooled MiniLM outputs), cached by text."""
        if not self.trainable.cache_texts:
            raise RuntimeError("text features are not cacheable with an unlocked text tower")
        digests = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        with self._locked("texts") as folder:
            return self._texts(folder, texts, digests)

    def _texts(self, folder: Path, texts: list[str], digests: list[str]) -> torch.Tensor:
        rows, array = self._load(folder, "texts")
        missing = sorted({d: t for d, t in zip(digests, texts) if d not in rows}.items())
        if missing:
            tokenizer = self.trainable.loaded.tokenizer
            parts = [array] if array is not None else []
            rows = dict(rows)
            offset = 0 if array is None else len(array)
            for start in range(0, len(missing), 256):
                chunk = missing[start : start + 256]
                feats = self.trainable.text_features(tokenizer([t for _, t in chunk]).to(self.encoder.device))
                parts.append(feats.cpu().numpy())
                for j, (d, _) in enumerate(chunk):
                    rows[d] = offset + start + j
            array = np.concatenate(parts)
            self._store(folder, "texts", rows, array)
        return torch.from_numpy(np.ascontiguousarray(array[[rows[d] for d in digests]]))

"""Batched image and text encoding: (n, d) float32 L2-normalised embeddings.

Decoding runs in DataLoader workers so it overlaps the model's forward pass on a GPU; on the CPU, where the
forward pass keeps its cores busy, by default in as many threads between forward passes. Bad images
are reported per item instead of aborting the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .device_decoding import DeviceJpegDecoder, decoded_ahead, device_preprocess_steps, pack_jpegs, read_for_device
from .devices import autocast_for
from .image_batches import (
    DecodedImage,
    ImageBatch,
    ReadableImages,
    decode_for_model,
    default_num_workers,
    embeddings_or_error,
    readable_embeddings,
    refuse_failures,
    unfilled_batch,
)
from .images import ImageInput
from .model_loading import LoadedModel


class _DecodeDataset(Dataset):
    def __init__(self, items: Sequence[ImageInput], preprocess, draft: int | None, thumbnails: bool = False,
                 read=decode_for_model) -> None:
        self.items = items
        self.preprocess = preprocess
        self.draft = draft
        self.thumbnails = thumbnails
        self.read = read  # decode_for_model, or read_for_device (JPEGs left to the device)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, DecodedImage | str]:
        return i, self.read(self.items[i], self.preprocess, self.draft, self.thumbnails)


def _collate(samples: list[tuple[int, DecodedImage | str]], dim: int,
             thumbnails: bool) -> tuple[torch.Tensor | None, ImageBatch]:
    """In the decoding worker: the batch's pixels stacked, and its batch still to be encoded."""
    pixels, batch = unfilled_batch(samples, dim, thumbnails)
    return (torch.stack(pixels) if pixels else None), batch


class _DevicePreprocess:
    """A torchvision pipeline split in two: workers resize and crop to uint8 (a quarter of float32's
    bytes to ship between processes, which is what limits decoding throughput next to a fast GPU);
    the model's device does the float conversion and normalisation."""

    def __init__(self, preprocess) -> None:
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        names = [type(t).__name__ for t in steps]
        to_tensor = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
        normalize = next((t for t in steps if isinstance(t, T.Normalize)), None)
        self.split = (to_tensor is not None and normalize is not None and steps[-1] is normalize
                      and names[to_tensor + 1 :] == ["Normalize"])
        if self.split:
            self.cpu = T.Compose([*steps[:to_tensor], T.PILToTensor()])
            self.mean = torch.tensor(normalize.mean).view(1, -1, 1, 1)
            self.std = torch.tensor(normalize.std).view(1, -1, 1, 1)
        else:
            self.cpu = preprocess

    def on_device(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return batch
        batch = batch.float().div_(255.0)
        return (batch - self.mean.to(batch.device)) / self.std.to(batch.device)


def pixel_finisher(preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """What turns a batch of `Encoder.pixels` into the model's input on its device: uint8 scaled to [0, 1] and
    normalised where the preprocessing ends in ToTensor + Normalize; the batch as it is otherwise."""
    return _DevicePreprocess(preprocess).on_device


CPU_FORWARD_ROWS = 8  # rows per model call on the CPU (`Encoder.forward`); decoding and progress keep the batch size


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model for every core


class Encoder:
    """Embeds images and texts with one loaded model."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, num_workers: int | None = None,
                 device_decoding: bool | None = None) -> None:
        """`device_decoding`: JPEGs decoded and resized on the model's device (engine/device_decoding.py); None:
        when the device is a GPU and the preprocessing allows it. True on the CPU runs the same path (tests)."""
        self.loaded = loaded
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._workers_chosen = num_workers is not None
        self._preprocess = _DevicePreprocess(loaded.preprocess)
        steps = device_preprocess_steps(loaded.preprocess) if self._preprocess.split else None
        if device_decoding and steps is None:
            raise ValueError(f"{loaded.identity.name}: its preprocessing cannot run on the device ({loaded.preprocess})")
        if device_decoding is None:
            device_decoding = steps is not None and self.device.type == "cuda"
        self._device_decoder = (DeviceJpegDecoder(steps, self.device, self._preprocess.cpu, loaded.image_size)
                                if device_decoding else None)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @torch.no_grad()
    def forward(self, encode: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """encode(batch) on the model's device, as encoding runs it: on the CPU in sub-batches of CPU_FORWARD_ROWS,
        each through the model while its activations are still in the caches (2 cores, images/s at 64 rows a call
        against 8: EfficientNet-lite0 19.9 -> 49.3, RN50 8.6 -> 12.0, ViT-B-32 17.6 -> 19.1; texts 62 -> 76,
        22.5 -> 24.6, 23.7 -> 24.0; the same outputs, bit for bit). A GPU takes the whole batch at once."""
        batch = batch.to(self.device, non_blocking=True)
        rows = CPU_FORWARD_ROWS if self.device.type == "cpu" else len(batch)
        with autocast_for(self.device):
            if len(batch) <= rows:
                return encode(batch).float()
            return torch.cat([encode(part).float() for part in batch.split(rows)])

    def _embed(self, encode, batch: torch.Tensor, normalize: bool = True, prepare=None) -> np.ndarray:
        if prepare is not None:
            batch = prepare(batch.to(self.device, non_blocking=True))
        features = self.forward(encode, batch)
        return (F.normalize(features, dim=-1) if normalize else features).cpu().numpy()

    def encode_texts(
        self, texts: Sequence[str], batch_size: int | None = None, progress: bool | None = None
    ) -> np.ndarray:
        """(n, d) float32 L2-normalised text embeddings."""
        texts = list(texts)
        bs = batch_size or self.batch_size
        out = [np.zeros((0, self.loaded.embed_dim), np.float32)]
        show = progress if progress is not None else len(texts) > 8 * bs
        for start in tqdm(range(0, len(texts), bs), desc="encode texts", unit="batch", disable=not show):
            tokens = self.loaded.tokenizer(texts[start : start + bs])
            out.append(self._embed(self.loaded.model.encode_text, tokens))
        return np.concatenate(out)

    def iter_image_batches(
        self,
        images: Sequence[ImageInput],
        batch_size: int | None = None,
        num_workers: int | None = None,
        progress: bool | None = None,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        normalize: bool = True,
        thumbnails: bool = False,
    ) -> Iterator[ImageBatch]:
        """Decode (in workers; on the CPU, unless workers are asked for, in threads between forward passes) and
        encode `images` batch by batch, in input order.

        `encode` replaces the model's encode_image (training caches a frozen trunk's features this
        way); `normalize=False` keeps its raw output; `thumbnails` adds each image's JPEG display copy,
        made from the decode the model uses (by the decoding workers, or on the device when it decodes)."""
        bs = batch_size or self.batch_size
        yield from self._encoded(self._decoded(images, bs, num_workers, thumbnails), len(images), bs, progress, encode,
                                 normalize)

    def pixels(self, images: Sequence[ImageInput], progress: bool | None = None,
               failures: list[tuple[int, str]] | None = None) -> torch.Tensor:
        """(n, C, H, W) the model's input pixels of `images`, in input order, on the CPU: for training with an unlocked
        image tower, which runs on them every step. uint8 where the preprocessing ends in ToTensor + Normalize (a
        quarter of float32's memory: 147 kB a 224 x 224 image against 588), to be finished by `pixel_finisher` batch by
        batch; float32 otherwise. An input that cannot be read: ImageDecodeError naming the first, or, given `failures`,
        left out (the rows are the readable inputs', in order) and recorded there as (index, reason)."""
        parts = []
        show = progress if progress is not None else len(images) > 4 * self.batch_size
        with tqdm(total=len(images), desc="decode images", unit="img", disable=not show) as bar:
            for tensors, batch in self._decoded(images, self.batch_size, None, False):
                if failures is None:
                    refuse_failures(batch, images)
                else:
                    failures.extend(batch.failures)
                if tensors is not None:
                    parts.append(tensors.cpu())
                bar.update(len(batch.indices) + len(batch.failures))
        side = self.loaded.image_size
        return torch.cat(parts) if parts else torch.zeros((0, 3, side, side), dtype=torch.uint8)

    def _decoded(self, images: Sequence[ImageInput], bs: int, num_workers: int | None,
                 thumbnails: bool) -> Iterator[tuple[torch.Tensor | None, ImageBatch]]:
        """Each batch's (pixels, batch still to be encoded), decoded where `iter_image_batches` says."""
        decoder = self._device_decoder
        if decoder is None and self.device.type == "cpu" and num_workers is None and not self._workers_chosen:
            yield from self._decoded_between_forwards(images, bs, thumbnails)
            return
        workers = self.num_workers if num_workers is None else num_workers
        if len(images) <= bs:
            workers = 0  # starting workers costs more than decoding one batch
        loader = DataLoader(
            _DecodeDataset(images, self._preprocess.cpu, self.loaded.image_size, thumbnails,
                           read_for_device if decoder else decode_for_model),
            batch_size=bs,
            num_workers=workers,
            collate_fn=pack_jpegs if decoder else partial(_collate, dim=self.loaded.embed_dim, thumbnails=thumbnails),
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            worker_init_fn=_single_threaded_worker,
        )
        yield from (decoded_ahead(loader, partial(self._decoded_on_device, images=images, thumbnails=thumbnails),
                                  self.device) if decoder else loader)

    def _encoded(self, parts, total: int, bs: int, progress: bool | None, encode, normalize: bool) -> Iterator[ImageBatch]:
        """The decoded batches' (pixels, batch) pairs through the model, with progress."""
        show = progress if progress is not None else total > 4 * bs
        with tqdm(total=total, desc="encode images", unit="img", disable=not show) as bar:
            for tensors, batch in parts:
                if tensors is not None:
                    batch.embeddings = self._embed(encode or self.loaded.model.encode_image, tensors, normalize,
                                                   prepare=self._preprocess.on_device)
                bar.update(len(batch.indices) + len(batch.failures))
                yield batch

    def _decoded_between_forwards(self, images: Sequence[ImageInput], bs: int,
                                  thumbnails: bool) -> Iterator[tuple[torch.Tensor | None, ImageBatch]]:
        """Each batch decoded by as many threads as the forward pass has (the thread budget), then handed to
        it, in turn. On the CPU the forward pass keeps its cores busy, and decoding beside it takes a core from
        one of its threads mid-pass while the others wait for it (effnet-minilm, 2 cores, one run: pipeline
        0.86 of the forward with a decoding worker, 0.90 so; with display copies 0.79 and 0.87; decoding alone
        4.0 ms an image on one thread, 2.3 on two; benchmarks/encode_throughput.py). Pillow's decoders and
        resampling release the GIL, so threads decode in parallel. Where decoding is a large share of the work
        overlapping wins instead: the ONNX image tower (~7 ms an image here) keeps its decoding threads beside
        its forward (0.73-0.87 of its forward overlapped, 0.58-0.67 in turns, one run)."""
        decode = partial(decode_for_model, preprocess=self._preprocess.cpu, draft=self.loaded.image_size,
                         thumbnails=thumbnails)
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            for start in range(0, len(images), bs):
                decoded = list(enumerate(pool.map(decode, images[start : start + bs]), start))
                yield _collate(decoded, self.loaded.embed_dim, thumbnails)

    def _decoded_on_device(self, packed: tuple[list[tuple[int, DecodedImage | str]], torch.Tensor],
                           images: Sequence[ImageInput], thumbnails: bool) -> tuple[torch.Tensor | None, ImageBatch]:
        """A batch whose JPEGs the workers only read (`pack_jpegs`): decoded on the device, stacked there with
        the rest."""
        samples, blob = packed
        pixels, batch = unfilled_batch(self._device_decoder.resolve(samples, images, thumbnails, blob),
                                       self.loaded.embed_dim, thumbnails)
        if not pixels:
            return None, batch
        return torch.stack([p.to(self.device, non_blocking=True) for p in pixels]), batch

    def encode_images(self, images: Sequence[ImageInput], **kwargs) -> np.ndarray:
        """(n, d) float32 L2-normalised image embeddings; raises ImageDecodeError on the first bad input."""
        return embeddings_or_error(self.iter_image_batches(images, **kwargs), images, self.loaded.embed_dim)

    def encode_readable_images(self, images: Sequence[ImageInput], **kwargs) -> ReadableImages:
        """The embeddings of the images that decode, and which did not and why (nothing raised for them)."""
        return readable_embeddings(self.iter_image_batches(images, **kwargs), self.loaded.embed_dim)

    def encode_image(self, image: ImageInput) -> np.ndarray:
        """(d,) embedding of one image."""
        return self.encode_images([image])[0]

    def encode_text(self, text: str) -> np.ndarray:
        """(d,) embedding of one text."""
        return self.encode_texts([text])[0]

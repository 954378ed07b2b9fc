"""JPEG decoding on the model's device: with a GPU, nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`.

Next to a fast GPU, decoding and resizing photos on the CPU is what limits encoding (ViT-B-32 on an H100:
the forward runs ~7,800 img/s, the CPU-decoding pipeline ~900 on 16 cores). Here the decoding workers only
read each file and its header (size, EXIF orientation and time); the model's device decodes the batch's
JPEGs in one call, applies the orientation, and resizes and crops as the model's preprocessing does
(torchvision's Resize/CenterCrop run on tensors alike). Everything else - other formats, CMYK JPEGs, files
without an end-of-image marker, JPEGs large enough for PIL's reduced-scale decode to be cheaper
(DRAFT_ON_CPU_FROM), anything the device's decoder refuses - goes through the CPU decode
(`image_batches.decode_for_model`), which also gives the reason a bad file is skipped. The same code runs on
the CPU (libjpeg through torchvision), which is how the suite tests it without a GPU.
"""

from __future__ import annotations

import io
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torchvision import transforms as T

from .image_batches import DecodedImage, decode_for_model
from .image_paths import is_raw_path
from .images import THUMBNAIL_SIDE, ImageDecodeError, ImageInput, check_size, open_heif, taken_time

_DEVICE_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) turns into RGB as PIL's convert does
DRAFT_ON_CPU_FROM = 4  # a JPEG whose shorter side is this many times the model's input or more is decoded by the
# workers at 1/4 or 1/8 scale (PIL's draft mode: 16-64x fewer pixels), cheaper than the device's full decode
# (nvJPEG through torchvision has no reduced-scale decode; on an H100 it decodes ~1,100 5-megapixel JPEGs a
# second, against ~10,600 of 0.3 megapixels)
Part = TypeVar("Part")
Result = TypeVar("Result")


@dataclass
class EncodedJpeg:
    """A JPEG left for the device to decode: its bytes and what the header says."""

    data: bytes  # empty once packed (`pack_jpegs`): then `span` locates it in the batch's buffer
    orientation: int  # EXIF orientation, 1..8 (1: as stored)
    span: tuple[int, int] | None = None


def device_preprocess_steps(preprocess) -> list[Callable] | None:
    """The resize and crop steps of a torchvision preprocessing pipeline that run on uint8 tensors as well,
    before its tensor conversion; None when any step needs a PIL image (then the device cannot take over)."""
    steps = []
    for step in getattr(preprocess, "transforms", []):
        name = type(step).__name__
        if name in ("ToTensor", "MaybeToTensor", "PILToTensor"):
            return steps
        if name in ("MaybeConvertMode",) or getattr(step, "__name__", "") == "_convert_to_rgb":
            continue  # RGB conversion: the decoder already returns RGB
        if not isinstance(step, (T.Resize, T.CenterCrop)):
            return None
        steps.append(step)
    return None


def read_for_device(item: ImageInput, preprocess: Callable, draft: int | None, thumbnails: bool) -> DecodedImage | str:
    """In a decoding worker: a JPEG's bytes and header for the device to decode, or, for anything the device
    should not take, the CPU decode (`decode_for_model`): a camera's RAW file goes there unread (LibRaw reads it)."""
    if not isinstance(item, (str, Path, bytes)) or (not isinstance(item, bytes) and is_raw_path(item)):
        return decode_for_model(item, preprocess, draft, thumbnails)
    label = str(item) if isinstance(item, (str, Path)) else "image"
    try:
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        open_heif()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # the CPU decode takes it (draft scale)
            header = Image.open(io.BytesIO(data))
        with header:
            if (header.format != "JPEG" or header.mode not in _DEVICE_MODES  # CMYK, YCCK: PIL converts them
                    or not data.rstrip(b"\0").endswith(b"\xff\xd9")  # no end marker: maybe truncated
                    or (draft and min(header.size) >= DRAFT_ON_CPU_FROM * draft)):
                return decode_for_model(item, preprocess, draft, thumbnails)
            check_size(header.size, label, None)
            orientation = int(header.getexif().get(0x0112, 1) or 1)
            return DecodedImage(EncodedJpeg(data, orientation if 1 <= orientation <= 8 else 1), header.size, b"",
                                taken_time(header))
    except ImageDecodeError as exc:
        return exc.reason
    except Exception:  # unreadable, not an image, a broken header: the CPU decode says why
        return decode_for_model(item, preprocess, draft, thumbnails)


def pack_jpegs(samples: list[tuple[int, DecodedImage | str]]) -> tuple[list[tuple[int, DecodedImage | str]], torch.Tensor]:
    """In the decoding worker (as the DataLoader's collate): the batch's deferred JPEGs packed into one uint8
    tensor, which reaches the main process through shared memory instead of being pickled through a pipe
    (as bytes, the workers' reading capped an H100's pipeline near 5,500 img/s)."""
    chunks: list[bytes] = []
    packed = []
    start = 0
    for index, d in samples:
        if isinstance(d, DecodedImage) and isinstance(d.pixels, EncodedJpeg):
            jpeg = d.pixels
            chunks.append(jpeg.data)
            d = replace(d, pixels=replace(jpeg, data=b"", span=(start, start + len(jpeg.data))))
            start += len(jpeg.data)
        packed.append((index, d))
    blob = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if start else torch.empty(0, dtype=torch.uint8)
    return packed, blob


def _oriented(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as PIL's ImageOps.exif_transpose shows it (EXIF orientation tags 2-8)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)  # 5: transpose
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]  # 6: rotate 270 = transpose + flip left-right, ...
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    return image


def _thumbnail_size(width: int, height: int, side: int = THUMBNAIL_SIDE) -> tuple[int, int]:
    """(height, width) of a display copy at most `side` on its longer side (only ever shrunk)."""
    scale = min(1.0, side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


class DeviceJpegDecoder:
    """Decodes a batch's deferred JPEGs on `device` into the model's uint8 crops (and display copies)."""

    def __init__(self, steps: list[Callable], device: torch.device, preprocess: Callable, draft: int | None) -> None:
        self.steps, self.device = steps, device
        self.preprocess, self.draft = preprocess, draft  # the CPU fallback's

    def _decode(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each JPEG decoded on the device, None where the decoder refuses it. One call for the batch; when it
        fails (it returns nothing on any error), one call per image finds the culprits."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out: list[torch.Tensor | None] = []
                for t in tensors:
                    try:
                        out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    @staticmethod
    def _grouped(images: list[torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """`transform` applied to each image, in one call for each group of images of one shape."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(j)
        for members in groups.values():
            for j, result in zip(members, transform(torch.stack([images[j] for j in members]))):
                out[j] = result
        return out

    def _crop(self, batch: torch.Tensor) -> torch.Tensor:
        """The preprocessing's resize and crop."""
        for step in self.steps:
            batch = step(batch)
        return batch

    def _thumbnails(self, images: list[torch.Tensor]) -> list[bytes]:
        from torchvision.io import encode_jpeg
        from torchvision.transforms.v2 import functional as TF

        copies = self._grouped(images, lambda batch: TF.resize(
            batch, list(_thumbnail_size(batch.shape[-1], batch.shape[-2])), antialias=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded = encode_jpeg(copies, quality=85)
        return [e.cpu().numpy().tobytes() for e in encoded]

    def resolve(self, samples: list[tuple[int, DecodedImage | str]], items, thumbnails: bool,
                blob: torch.Tensor | None = None) -> list[tuple[int, DecodedImage | str]]:
        """The batch with each deferred JPEG decoded (its `pixels` a uint8 crop on the device); one the device
        cannot decode is decoded on the CPU instead, which keeps it or says why it is skipped. `blob`: the
        buffer `pack_jpegs` packed the batch's JPEGs into."""
        deferred = [k for k, (_, d) in enumerate(samples) if isinstance(d, DecodedImage) and isinstance(d.pixels, EncodedJpeg)]
        if not deferred:
            return samples
        jpegs = [samples[k][1].pixels for k in deferred]
        decoded = self._decode([blob[j.span[0]:j.span[1]] if j.span else torch.frombuffer(bytearray(j.data), dtype=torch.uint8)
                                for j in jpegs])
        out = list(samples)
        ok = []
        for k, image in zip(deferred, decoded):
            index, d = samples[k]
            if image is None:
                out[k] = (index, decode_for_model(items[index], self.preprocess, self.draft, thumbnails))
            else:
                ok.append((k, _oriented(image, d.pixels.orientation)))
        if ok:
            images = [image for _, image in ok]
            crops = self._grouped(images, self._crop)
            copies = self._thumbnails(images) if thumbnails else [b""] * len(ok)
            for (k, image), crop, copy in zip(ok, crops, copies):
                index, d = samples[k]
                out[k] = (index, DecodedImage(crop, (image.shape[-1], image.shape[-2]), copy, d.taken))
        return out


def decoded_ahead(parts: Iterable[Part], decode: Callable[[Part], Result], device: torch.device,
                  depth: int = 2) -> Iterator[Result]:
    """`decode(part)` for each part, in order, up to `depth` parts ahead in a background thread: on a GPU on a
    stream of its own, so the next batches decode while the caller's forward pass runs (torch and nvJPEG
    release the interpreter lock). Each result's tensors are handed to the caller's stream."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def work(part: Part) -> Result:
        if stream is None:
            return decode(part)
        with torch.cuda.stream(stream):
            result = decode(part)
        stream.synchronize()
        return result

    with ThreadPoolExecutor(1, thread_name_prefix="otclip-device-decode") as pool:
        pending: deque = deque()
        for part in parts:
            pending.append(pool.submit(work, part))
            if len(pending) > depth:
                yield _on_current_stream(pending.popleft().result(), stream)
        while pending:
            yield _on_current_stream(pending.popleft().result(), stream)


def _on_current_stream(result, stream):
    """Tell the caching allocator that the caller's stream uses the tensors made on the decoding stream."""
    if stream is not None:
        for item in result if isinstance(result, tuple) else (result,):
            if isinstance(item, torch.Tensor):
                item.record_stream(torch.cuda.current_stream(item.device))
    return result

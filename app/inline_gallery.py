"""A result gallery whose tiles travel inside the search's own response, as `data:` URIs.

A page of 12 results shown through files costs the browser 12 more requests after the results arrive, and
the server ~2.8 ms of Python each (Gradio's file route and its allowed-path checks, one event loop): 33 ms
of a 68 ms page at one user (`benchmarks/app_load.py`). A tile is a thumbnail of a few tens of kB, so
base64 in the response costs less than a request for it, and no route has to serve anything.
Gradio's own Gallery sends SVGs the same way (`ImageData` with a `data:` url and no path, which its file
handling leaves alone). The named API endpoints keep the file-served gallery for gradio_client.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import gradio as gr
from gradio.components.gallery import GalleryData, GalleryImage
from gradio.data_classes import ImageData
from PIL import Image

from otclip.engine.images import thumbnail_jpeg


def jpeg_data_uri(tile: str | Path | Image.Image) -> str:
    """A tile as a `data:image/jpeg;base64,...` URI: a kept thumbnail file's bytes as they are, or an image
    made on the fly encoded as the index's thumbnails are."""
    if isinstance(tile, Image.Image):
        return _data_uri(thumbnail_jpeg(tile))
    return _kept_tile_uri(str(tile))


@functools.lru_cache(maxsize=1024)
def _kept_tile_uri(path: str) -> str:
    """Kept thumbnails are named by their image's sha256 and never rewritten: one read each (~30 kB a URI)."""
    return _data_uri(Path(path).read_bytes())


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def inline_gallery(**options) -> gr.Gallery:
    """A `gr.Gallery` (`options` as Gradio's) for the app's own output-only galleries: (tile, caption) pairs
    in, inline tiles out. Only the app's code sets its value (it is never an input), with thumbnails the
    index kept or made. Its `postprocess` is replaced on the instance rather than in a subclass: Gradio
    writes a `.pyi` stub beside the source file of every Component subclass when it is defined."""
    gallery = gr.Gallery(**options)

    def postprocess(value: list[tuple[str | Path | Image.Image, str]] | None) -> GalleryData:
        tiles = [GalleryImage(image=ImageData(url=jpeg_data_uri(tile), mime_type="image/jpeg"), caption=caption)
                 for tile, caption in value or []]
        return GalleryData(root=tiles)

    gallery.postprocess = postprocess
    return gallery

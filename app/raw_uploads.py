"""Cameras' RAW files (DNG, CR3, NEF, ...) as image queries in the app's image boxes.

Three things stood in the way, each met here:
- the page refused them: Gradio's image box takes only files whose browser MIME type starts with `image/`, and
  browsers give most RAW files none (Chromium: an empty type for a .DNG or a .CR3), so the upload never left the
  page; and its file chooser offered only `image/*`. `PAGE_SCRIPT` (in the page's head) gives such files the type
  `image/x-raw` as they are chosen or dropped, and adds the RAW extensions to the chooser;
- Gradio's `Image.preprocess` opens every upload with Pillow, which cannot open most (CR3, RAF, ORF, RW2; of a
  DNG, the first image at best): a RAW upload is handed over as its file, and LibRaw decodes it in `load_image`,
  as `otclip index` does (this is also what serves `gradio_client` and the HTTP API);
- the browser cannot draw one: once uploaded, the box's value becomes a JPEG of LibRaw's decode (`raw_preview`),
  which the page shows and the search embeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from otclip.engine.atomic_files import write_atomically
from otclip.engine.image_paths import RAW_EXTENSIONS, is_raw_path
from otclip.engine.images import ImageDecodeError, load_image, thumbnail_jpeg

RAW_MIME_TYPE = "image/x-raw"  # what a RAW file without a type is given on the page (any image/ type passes)
RAW_PREVIEW_SIDE = 1024  # pixels on the longer side of the JPEG that stands for a RAW upload (the model sees <= 384)

# Capture-phase listeners on the document run before Gradio's own (on the file input, on the drop zone): a chosen
# file list is replaced with typed copies (an input's `files` may be set), a drop is stopped and sent again with
# them (its `dataTransfer` may not be changed). A click that opens an image box's chooser widens its `accept`.
PAGE_SCRIPT = """<script>
(() => {
  const raw = new Set(RAW_EXTENSIONS);
  const isRaw = (f) => !f.type && raw.has(f.name.slice(f.name.lastIndexOf(".")).toLowerCase());
  const typed = (files) => {
    const copies = new DataTransfer();
    for (const f of files) {
      copies.items.add(isRaw(f) ? new File([f], f.name, {type: RAW_MIME_TYPE, lastModified: f.lastModified}) : f);
    }
    return copies;
  };
  const imageInput = (t) => t instanceof HTMLInputElement && t.type === "file" && t.accept.split(",").includes("image/*");
  document.addEventListener("change", (e) => {
    if (imageInput(e.target) && [...e.target.files].some(isRaw)) e.target.files = typed(e.target.files).files;
  }, true);
  document.addEventListener("drop", (e) => {
    const files = e.dataTransfer ? [...e.dataTransfer.files] : [];
    if (!files.some(isRaw)) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    e.target.dispatchEvent(new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: typed(files)}));
  }, true);
  document.addEventListener("click", (e) => {
    if (imageInput(e.target) && !e.target.accept.includes(".dng")) e.target.accept += "," + [...raw].join(",");
  }, true);
})();
</script>""".replace("RAW_EXTENSIONS", json.dumps(sorted(RAW_EXTENSIONS))).replace("RAW_MIME_TYPE", json.dumps(RAW_MIME_TYPE))


def accept_raw_uploads(box: gr.Image, max_pixels: int) -> gr.Image:
    """Let an image box (type="filepath") take RAW files: its `preprocess` hands one over as its file, and its upload
    event replaces it with `raw_preview`'s JPEG. (Set on the instance: a subclass of a Gradio component makes Gradio
    write a .pyi file beside its module at import.)"""
    gradio_preprocess = box.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and is_raw_path(payload.orig_name or payload.path):
            return str(payload.path)  # in Gradio's upload folder, with the upload's name
        return gradio_preprocess(payload)

    box.preprocess = preprocess
    box.upload(lambda payload: raw_preview(payload, max_pixels), box, box, api_name=False, queue=False,
               preprocess=False, show_progress="hidden")
    return box


def raw_preview(payload: dict | None, max_pixels: int) -> str | None:
    """The image box's value for a RAW upload: a JPEG of LibRaw's decode (as `otclip index` decodes the file),
    RAW_PREVIEW_SIDE pixels on its longer side, written beside the upload in Gradio's upload folder. Any other
    upload, or a RAW file LibRaw cannot read, is left as it is (`gr.skip`: the search then says why). Gradio has
    checked that the path is an upload before this runs."""
    if not payload or not is_raw_path(payload.get("orig_name") or payload.get("path") or ""):
        return gr.skip()
    upload = Path(payload["path"])
    try:
        picture = load_image(upload, max_pixels=max_pixels)
    except ImageDecodeError:
        return gr.skip()
    jpeg = thumbnail_jpeg(picture, RAW_PREVIEW_SIDE)
    return str(write_atomically(upload.with_name(upload.name + ".jpg"), lambda tmp: Path(tmp).write_bytes(jpeg)))

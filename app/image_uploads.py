"""What the app's image boxes take: every format `otclip index` reads, cameras' RAW files and phones' HEIC included.

Gradio's image box stood in the way three times, each met here:
- the page refused a file whose browser MIME type does not start with `image/`, and browsers give most RAW files
  none (Chromium: an empty type for a .DNG or a .CR3), so the upload never left the page; and its file chooser
  offered only `image/*`. `PAGE_SCRIPT` (in the page's head) types such files by their extension as they are chosen
  or dropped, and adds the extensions to the chooser;
- Gradio's `Image.preprocess` opens each upload with Pillow before the app sees it: Pillow cannot open most RAW
  files (CR3, RAF, ORF, RW2; of a DNG, the first image at best), nor a HEIC in a fresh server (pillow-heif is taught
  to Pillow at the first decode, `images.open_heif`). An upload is handed over as its file, and `load_image` decodes
  it, as `otclip index` does (what `gradio_client` and the HTTP API get too);
- the browser cannot draw RAW, HEIC or TIFF files (Chromium; Safari draws the last two): once uploaded, such a box's
  value becomes a JPEG of the decode (`browser_copy`), which the page shows and the search embeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from otclip.engine.atomic_files import write_bytes_atomically
from otclip.engine.image_paths import IMAGE_EXTENSIONS, RAW_EXTENSIONS
from otclip.engine.images import ImageDecodeError, load_image, thumbnail_jpeg

BROWSER_UNDRAWN = RAW_EXTENSIONS | {".heic", ".heif", ".tif", ".tiff"}  # what Chromium cannot draw in the box
BROWSER_COPY_SIDE = 1024  # pixels on the longer side of the JPEG that stands for such an upload (the model sees <= 384)

# Capture-phase listeners on the document run before Gradio's own (on the file input, on the drop zone): a chosen
# file list is replaced with typed copies (an input's `files` may be set), a drop is stopped and sent again with
# them (its `dataTransfer` may not be changed). A click that opens an image box's chooser widens its `accept`.
PAGE_SCRIPT = """<script>
(() => {
  const known = new Set(IMAGE_EXTENSIONS);
  const extension = (f) => f.name.slice(f.name.lastIndexOf(".")).toLowerCase();
  const untyped = (f) => !f.type && known.has(extension(f));
  const typed = (files) => {
    const copies = new DataTransfer();
    for (const f of files) {
      const type = "image/" + extension(f).slice(1);
      copies.items.add(untyped(f) ? new File([f], f.name, {type, lastModified: f.lastModified}) : f);
    }
    return copies;
  };
  const imageInput = (t) => t instanceof HTMLInputElement && t.type === "file" && t.accept.split(",").includes("image/*");
  document.addEventListener("change", (e) => {
    if (imageInput(e.target) && [...e.target.files].some(untyped)) e.target.files = typed(e.target.files).files;
  }, true);
  document.addEventListener("drop", (e) => {
    const files = e.dataTransfer ? [...e.dataTransfer.files] : [];
    if (!files.some(untyped)) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    e.target.dispatchEvent(new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: typed(files)}));
  }, true);
  document.addEventListener("click", (e) => {
    if (imageInput(e.target) && !e.target.accept.includes(".dng")) e.target.accept += "," + [...known].join(",");
  }, true);
})();
</script>""".replace("IMAGE_EXTENSIONS", json.dumps(sorted(IMAGE_EXTENSIONS)))


def accept_images(box: gr.Image, max_pixels: int) -> gr.Image:
    """Let an image box (type="filepath") take what `otclip index` reads: its `preprocess` hands an upload over as
    its file, and its upload event replaces one the browser cannot draw with `browser_copy`'s JPEG. (Set on the
    instance: a subclass of a Gradio component makes Gradio write a .pyi file beside its module at import.)"""
    gradio_preprocess = box.preprocess

    def preprocess(payload):
        if payload is not None and payload.path:
            return str(payload.path)  # in Gradio's upload folder, with the upload's name
        return gradio_preprocess(payload)  # an image inline in the request (a data: URL)

    box.preprocess = preprocess
    box.upload(lambda payload: browser_copy(payload, max_pixels), box, box, api_name=False, queue=False,
               preprocess=False, show_progress="hidden")
    return box


def browser_copy(payload: dict | None, max_pixels: int) -> str | None:
    """The image box's value for an upload the browser cannot draw (BROWSER_UNDRAWN): a JPEG of its decode (as
    `otclip index` decodes the file), BROWSER_COPY_SIDE pixels on its longer side, written beside the upload in
    Gradio's upload folder. Any other upload, or a file that cannot be decoded, is left as it is (`gr.skip`: the
    search then says why). Gradio has checked that the path is an upload before this runs."""
    if not payload or Path(payload.get("orig_name") or payload["path"]).suffix.lower() not in BROWSER_UNDRAWN:
        return gr.skip()
    upload = Path(payload["path"])
    try:
        picture = load_image(upload, max_pixels=max_pixels)
    except ImageDecodeError:
        return gr.skip()
    return str(write_bytes_atomically(upload.with_name(upload.name + ".jpg"), thumbnail_jpeg(picture, BROWSER_COPY_SIDE)))

"""Test galleries: awkward and broken image files, written on demand."""

from __future__ import annotations


def write_odd_images(folder) -> dict:
    """Images in every awkward form a real collection has, plus broken files. Returns name -> path."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from otclip.engine.sample_photos import sample_photo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cat = sample_photo("chelsea")
    paths = {}

    def save(name, img, **kw):
        paths[name] = folder / name
        img.save(paths[name], **kw)

    save("cmyk.JPG", cat.convert("CMYK"), format="JPEG")
    arr16 = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("gray16.png", Image.fromarray(arr16, mode="I;16"))
    save("palette.gif", cat.convert("P", palette=Image.Palette.ADAPTIVE))
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    frames = [cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW when displayed
    save("rotated.jpg", cat.transpose(Image.Transpose.ROTATE_90), exif=exif, format="JPEG")
    save("non-ascii-é猫.webp", cat, format="WEBP")
    save("plain.tiff", cat, format="TIFF")
    save("plain.bmp", cat, format="BMP")
    good = folder / "full.jpg"
    cat.save(good, format="JPEG")
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    paths["truncated.jpg"] = folder / "truncated.jpg"
    (folder / "empty.png").write_bytes(b"")
    paths["empty.png"] = folder / "empty.png"
    (folder / "notes.jpg").write_text("this is not an image\n")
    paths["notes.jpg"] = folder / "notes.jpg"
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")
    paths["dangling.jpg"] = folder / "dangling.jpg"
    save("strip.png", Image.new("RGB", (1, 30000)))  # 204 bytes; resized to the model's input it was 7.6 GB
    return paths


BROKEN = {"truncated.jpg", "empty.png", "notes.jpg", "dangling.jpg", "strip.png"}


def index_demo_photos(demo_index, names, folder, index, model):
    """Copies of the demo's photos `names` added to `folder` and indexed into `index` (built, or brought up to date):
    a collection of chosen subjects, which a second call grows."""
    import shutil
    from pathlib import Path

    from otclip.indexer.pipeline import index_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(Path(demo_index) / "data" / "photos" / name, folder / name)
    index_images(folder, index, model, progress=False, workers=0, query_models=False)

import datetime

import numpy as np
import pytest
from PIL import Image

from otclip.engine.image_paths import is_image_path
from otclip.engine.images import ImageDecodeError, load_image

from gallery import BROKEN, write_odd_images


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return write_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize(
    "name", ["cmyk.JPG", "gray16.png", "palette.gif", "rgba.png", "animated.gif", "non-ascii-é猫.webp",
             "plain.tiff", "plain.bmp", "rotated.jpg"]
)
def test_awkward_formats_decode_to_rgb(odd, name):
    img = load_image(odd[name])
    assert img.mode == "RGB"
    assert img.size == (451, 300)  # the rotated one is turned back upright by its EXIF orientation


def test_sixteen_bit_keeps_its_contrast(odd):
    arr = np.asarray(load_image(odd["gray16.png"]))
    assert arr.max() - arr.min() > 150


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(load_image(img)).min() == 255


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_raise_an_error_naming_the_file(odd, name):
    with pytest.raises(ImageDecodeError) as info:
        load_image(odd[name])
    assert str(odd[name]) in str(info.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(path)


def test_a_medium_format_jpeg_decodes_at_the_scale_the_model_needs(tmp_path, monkeypatch):
    """PIL's bomb limit (89.5 megapixels) refused every 100-megapixel camera's photo from its header; the limit now
    applies to what is decoded: a JPEG decoded at an eighth of its side in draft mode loads, and the index records
    the photo's own size. Decoded whole (no draft, or a format without one) beyond the limit: refused."""
    from otclip.engine.images import photo_size

    path = tmp_path / "gfx100.jpg"  # 11648 x 8736, a 102-megapixel medium-format frame
    Image.new("RGB", (11648, 8736), (90, 120, 150)).save(path, quality=70)
    image = load_image(path, draft=224)
    assert photo_size(image) == (11648, 8736) and image.size == (1456, 1092)
    assert np.abs(np.asarray(image, float).mean((0, 1)) - (90, 120, 150)).max() < 2
    with pytest.raises(ImageDecodeError, match=r"too large to decode safely \(11648x8736 pixels to decode"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # the same at a small scale, and for a PNG
    Image.new("RGB", (1600, 1200)).save(tmp_path / "a.jpg")
    Image.new("RGB", (1600, 1200)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.jpg", draft=224).size == (400, 300)
    with pytest.raises(ImageDecodeError, match=r"\(1600x1200 pixels to decode, beyond 1,000,000\)"):
        load_image(tmp_path / "a.png", draft=224)


def test_image_extensions_any_case():
    assert is_image_path("a/B.JPEG") and is_image_path("x.TiFf") and not is_image_path("x.txt")
    assert is_image_path("IMG_1.CR3") and is_image_path("DSC_1.nef") and is_image_path("a.DNG")


def test_a_strip_is_refused_from_its_header_whatever_the_input(tmp_path):
    strip = Image.new("RGB", (1, 30000))
    strip.save(tmp_path / "thin.png")
    for source in (tmp_path / "thin.png", (tmp_path / "thin.png").read_bytes(), strip):
        with pytest.raises(ImageDecodeError, match="1x30000 is a strip"):
            load_image(source)
    assert load_image(Image.new("RGB", (40, 800))).size == (40, 800)  # 20:1 panoramas still load


def test_the_pixel_limit_is_checked_before_decoding(tmp_path):
    """A PNG that declares 8000 x 6000 pixels but holds almost none: the header decides."""
    big = tmp_path / "big.png"
    Image.new("L", (8000, 6000)).save(big)
    (tmp_path / "cut.png").write_bytes(big.read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match="8000x6000 is too large"):
        load_image(tmp_path / "cut.png", max_pixels=40_000_000)


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_phone_formats_are_indexed_images(tmp_path, suffix):
    """#11: HEIC (pillow-heif) and AVIF (Pillow) photos decode to the picture that was encoded."""
    from otclip.engine.sample_photos import sample_photo

    original = sample_photo("chelsea").convert("RGB")
    path = tmp_path / f"cat{suffix.upper()}"
    if suffix == ".heic":
        import pillow_heif

        pillow_heif.from_pillow(original).save(path, quality=90)
    else:
        original.save(path, format="AVIF", quality=90)
    assert is_image_path(path)
    decoded = load_image(path)
    assert decoded.size == original.size
    error = np.abs(np.asarray(decoded, np.float64) - np.asarray(original, np.float64)).mean()
    assert error < 8, error  # lossy, but the same picture


@pytest.mark.parametrize("orientation,shown", [(1, (1000, 800)), (6, (800, 1000)), (3, (1000, 800))])
def test_a_draft_decoded_jpeg_still_reports_the_photos_size(tmp_path, encoder, orientation, shown):
    """JPEGs are decoded at a reduced scale for the model (draft); the index must still record the photo's own size
    (as shown, EXIF orientation applied): `--min-width` filters on it. It recorded the draft's (250 x 200 here)."""
    from PIL import ImageOps

    from otclip.engine.images import photo_size

    path = tmp_path / "photo.jpg"
    image = Image.new("RGB", (1000, 800), (200, 100, 50))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", exif=exif)
    assert ImageOps.exif_transpose(Image.open(path)).size == shown
    drafted = load_image(path, draft=224)
    assert max(drafted.size) < 1000 and photo_size(drafted) == shown
    assert photo_size(load_image(path)) == shown
    assert photo_size(load_image(Image.open(path), draft=224)) == shown
    (batch,) = encoder.iter_image_batches([path], thumbnails=True)
    assert batch.sizes == [shown]


def _two_colours(h: int = 256, w: int = 384) -> np.ndarray:
    """A scene: orange on the left, blue on the right (linear values)."""
    rgb = np.zeros((h, w, 3))
    rgb[:, : w // 2], rgb[:, w // 2 :] = [0.8, 0.4, 0.1], [0.1, 0.3, 0.8]
    return rgb


@pytest.mark.parametrize("preview", [True, False])
def test_a_camera_raw_file_decodes_to_its_picture_turned_as_shot(tmp_path, preview):
    """A DNG (a 16-bit Bayer mosaic, written by the tests, read by LibRaw): through its embedded preview, or
    demosaiced when it has none; turned by its orientation (6: 90 degrees clockwise, so the left half comes on top),
    the sensor's size recorded as shown, the time LibRaw reads from the file (a demosaiced mosaic has no EXIF to carry
    it: its time had been the file's mtime)."""
    from raw_files import write_dng

    from otclip.engine.images import photo_size, taken_time

    path = write_dng(tmp_path / "IMG_1.dng", _two_colours(), preview=preview, orientation=6, taken="2021:06:05 14:30:00")
    image = load_image(path, draft=224)
    pixels = np.asarray(image, float)
    top, bottom = pixels[: image.height // 3].mean((0, 1)), pixels[-image.height // 3 :].mean((0, 1))
    assert photo_size(image) == (256, 384) and image.width < image.height
    assert top[0] > top[1] > top[2] and bottom[2] > bottom[1] > bottom[0]  # orange above blue
    assert taken_time(image) == pytest.approx(datetime.datetime(2021, 6, 5, 14, 30).timestamp())  # LibRaw's
    if preview:  # the camera's rendering: the scene at gamma 2.2
        assert image.size == (256, 384) and np.abs(top - 255 * np.array([0.8, 0.4, 0.1]) ** (1 / 2.2)).max() < 4
    else:  # LibRaw's rendering of the mosaic at half size
        assert image.size == (128, 192)
    no_time = write_dng(tmp_path / "IMG_2.dng", _two_colours(), preview=preview)
    assert taken_time(load_image(no_time, draft=224)) is None  # not the epoch: the file's mtime stands for it
    if preview:  # a preview smaller than the model needs: the mosaic instead
        assert load_image(path, draft=300).size == (128, 192)
    uploaded = load_image(path.read_bytes(), name="IMG_1.DNG", draft=224)  # an upload: known by its file name
    assert photo_size(uploaded) == (256, 384) and np.array_equal(np.asarray(uploaded), pixels)


def test_a_raw_file_that_cannot_be_decoded_is_named(tmp_path):
    (tmp_path / "IMG_9.CR2").write_bytes(b"II*\0" + bytes(200))
    with pytest.raises(ImageDecodeError, match=r"IMG_9.CR2: RAW file cannot be decoded"):
        load_image(tmp_path / "IMG_9.CR2")
    with pytest.raises(ImageDecodeError, match=r"IMG_9.CR2: RAW file cannot be decoded"):
        load_image((tmp_path / "IMG_9.CR2").read_bytes(), name="IMG_9.CR2")

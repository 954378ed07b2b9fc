import numpy as np
import pytest
from PIL import Image

from otclip.engine.images import ImageDecodeError, is_image_path, load_image

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


def test_image_extensions_any_case():
    assert is_image_path("a/B.JPEG") and is_image_path("x.TiFf") and not is_image_path("x.txt")

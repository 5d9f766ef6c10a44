"""Decoding every image mode to float [0, 1], BT.601 luma, EXIF rotation, bad files,
and the centre-crop-and-resize fit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from src import images
from src.errors import UserError


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


# --- luma -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixel, expected",
    [
        ((1, 0, 0), 0.299),
        ((0, 1, 0), 0.587),
        ((0, 0, 1), 0.114),
        ((1, 1, 1), 1.0),
        ((0, 0, 0), 0.0),
        ((0.5, 0.5, 0.5), 0.5),
    ],
)
def test_luma_of_known_pixels(pixel, expected):
    gray = images.luma(np.full((2, 3, 3), pixel, dtype=np.float32))
    assert gray.shape == (2, 3) and gray.dtype == np.float32
    assert np.abs(gray - expected).max() < 1e-6


def test_luma_matches_pillow_convert_l(rgb):
    ours = images.luma(rgb / 255.0) * 255
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    assert np.abs(ours - pillow).max() <= 0.51  # Pillow rounds to whole levels


def test_luma_passes_grayscale_through_and_refuses_other_shapes():
    gray = np.random.default_rng(1).random((5, 6)).astype(np.float32)
    assert np.array_equal(images.luma(gray), gray)
    with pytest.raises(ValueError):
        images.luma(np.zeros((5, 6, 4), dtype=np.float32))


# --- read_image: every mode -----------------------------------------------------


def test_rgb_png_and_jpeg(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = images.read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (30, 40, 3)
    assert np.array_equal(out, rgb / np.float32(255))
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    jpeg = images.read_image(tmp_path / "a.jpg")
    assert jpeg.shape == (30, 40, 3) and 0 <= jpeg.min() and jpeg.max() <= 1


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    out = images.read_image(tmp_path / "a.png")
    assert out.shape == (1, 3, 3)
    assert out[0, 0] == pytest.approx([1, 0, 0])  # opaque: its own colour
    assert out[0, 1] == pytest.approx([1, 1, 1])  # transparent: white, not the hidden blue
    assert out[0, 2] == pytest.approx([127 / 255] * 3, abs=1 / 255)  # half black on white


def test_l_and_la(tmp_path):
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert images.read_image(tmp_path / "l.png") == pytest.approx(gray / 255.0, abs=1e-7)
    la = Image.merge(
        "LA", [Image.fromarray(gray), Image.fromarray(np.array([[255, 255, 0]], dtype=np.uint8))]
    )
    la.save(tmp_path / "la.png")
    out = images.read_image(tmp_path / "la.png")
    assert out.shape == (1, 3) and out[0] == pytest.approx([0, 128 / 255, 1.0])


def test_palette_with_and_without_transparency(tmp_path, rgb):
    Image.fromarray(rgb).quantize(16).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "P"
        expected = np.asarray(img.convert("RGB")) / np.float32(255)
    assert np.array_equal(images.read_image(tmp_path / "p.png"), expected)
    indexed = Image.new("P", (2, 1))
    indexed.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    indexed.putdata([0, 1])
    indexed.info["transparency"] = 1
    indexed.save(tmp_path / "pt.png", transparency=1)
    out = images.read_image(tmp_path / "pt.png")
    assert out[0, 0] == pytest.approx([1, 0, 0]) and out[0, 1] == pytest.approx([1, 1, 1])


def test_cmyk(tmp_path, rgb):
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    for name in ("c.jpg", "c.tif"):
        out = images.read_image(tmp_path / name)
        assert out.shape == (30, 40, 3)
    assert np.abs(images.read_image(tmp_path / "c.tif") - rgb / 255).max() < 2 / 255


@pytest.mark.parametrize(
    "name, mode", [("g16.png", "I;16"), ("g16.tif", "I;16"), ("g16b.tif", "I;16B")]
)
def test_sixteen_bit_is_divided_by_65535(tmp_path, name, mode):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    if mode == "I;16B":  # big-endian, as some scanners and TIFF writers store it
        img = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    else:
        img = Image.fromarray(values)
    img.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    out = images.read_image(tmp_path / name)
    assert out.dtype == np.float32 and out.shape == (1, 4)
    assert out[0] == pytest.approx(values[0] / 65535.0, abs=1e-7)


def test_thirty_two_bit_int_and_float(tmp_path):
    Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    assert images.read_image(tmp_path / "i.tif")[0] == pytest.approx([0, 1, 1])
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert images.read_image(tmp_path / "f.tif")[0] == pytest.approx([0, 0.25, 1])
    # Outside [0, 1] float data is stretched to it, not clipped flat.
    Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), "F").save(tmp_path / "g.tif")
    assert images.read_image(tmp_path / "g.tif")[0] == pytest.approx([0, 0.5, 1])


def test_bilevel(tmp_path):
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    assert images.read_image(tmp_path / "b.png")[0] == pytest.approx([0, 1])


def test_exif_orientation_is_applied(tmp_path, rgb):
    img = Image.fromarray(rgb)  # 40 wide, 30 high
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90° clockwise
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "r.jpg").size == (40, 30)
    assert images.read_image(tmp_path / "r.jpg").shape == (40, 30, 3)


# --- bad files --------------------------------------------------------------------


def test_bad_image_is_a_user_error():
    assert issubclass(images.BadImage, UserError)


def test_truncated_jpeg(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.BadImage, match=r"^cut\.jpg: cannot be read"):
        images.read_image(tmp_path / "cut.jpg")


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(images.BadImage, match=r"empty\.png: empty file"):
        images.read_image(tmp_path / "empty.png")


def test_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    with pytest.raises(images.BadImage, match="not an image"):
        images.read_image(tmp_path / "notes.jpg")


# 400 px is past 2× a limit of 150 (Pillow raises) and past 1× a limit of 300 (Pillow only warns).
@pytest.mark.parametrize("limit", [150, 300])
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(images.BadImage, match="decompression bomb"):
        images.read_image(tmp_path / "bomb.png")


def test_a_message_is_one_line(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    with pytest.raises(images.BadImage) as caught:
        images.read_image(tmp_path / "cut.png")
    assert "\n" not in str(caught.value)


# --- fit --------------------------------------------------------------------------


def test_fit_crops_the_centre_then_resizes():
    wide = np.full((60, 100), 0.5, dtype=np.float32)
    wide[:, :20] = 1.0  # outside the centred 60×60 square
    wide[:, 80:] = 0.0
    out = images.fit(wide, 32)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert np.abs(out - 0.5).max() < 1e-5
    tall = np.zeros((90, 30), dtype=np.float32)
    tall[30:60] = 1.0
    assert np.array_equal(images.fit(tall, 30), np.ones((30, 30)))


def test_fit_leaves_a_right_sized_image_untouched():
    square = np.random.default_rng(2).random((48, 48)).astype(np.float32)
    assert np.array_equal(images.fit(square, 48), square)


@pytest.mark.parametrize("shape", [(17, 300), (256, 256), (512, 384), (40, 41), (300, 200, 3)])
def test_fit_mixed_sizes_stay_in_range(shape):
    rng = np.random.default_rng(3)
    image = (rng.random(shape) > 0.5).astype(np.float32)  # hard edges make Lanczos ring
    out = images.fit(image, 64)
    assert out.shape == (64, 64, *shape[2:]) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_rgb_fitted_has_the_same_crop_as_gray_fitted(tmp_path):
    x = np.linspace(0, 1, 120)
    smooth = np.stack(
        [np.outer(np.linspace(0, 1, 80), x), np.tile(x, (80, 1)), np.full((80, 120), 0.3)], axis=2
    )
    Image.fromarray((smooth * 255).round().astype(np.uint8)).save(tmp_path / "c.png")
    rgb = images.read_rgb_fitted(tmp_path / "c.png", 40)
    gray = images.read_gray_fitted(tmp_path / "c.png", 40)
    assert rgb.shape == (40, 40, 3) and gray.shape == (40, 40)
    assert np.abs(images.luma(rgb) - gray).max() < 1e-3  # luma and resizing are both linear
    Image.fromarray((smooth[..., 0] * 255).astype(np.uint8)).save(tmp_path / "g.png")
    planes = images.read_rgb_fitted(tmp_path / "g.png", 40)
    assert np.array_equal(planes[..., 0], planes[..., 2])


def test_suffixes_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff"} <= set(images.IMAGE_SUFFIXES)
    assert all(s.startswith(".") and s == s.lower() for s in images.IMAGE_SUFFIXES)


def test_an_animated_gif_is_read_as_its_first_frame(tmp_path):
    assert ".gif" in images.IMAGE_SUFFIXES  # so the sources pick GIFs up
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    frames = []
    for i, colour in enumerate(colours):
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[:, : 16 * (i + 1)] = colour  # each frame differs in colour and in shape
        frames.append(Image.fromarray(pixels))
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.is_animated
    out = images.read_image(path)
    assert out.shape == (48, 64, 3)
    assert np.array_equal(out, np.asarray(frames[0]) / np.float32(255))
    assert images.read_gray_fitted(path, 32).shape == (32, 32)


def test_an_image_smaller_than_the_largest_kernel_is_bad(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((20, 64, 3), dtype=np.uint8)).save(path)
    with pytest.raises(images.BadImage, match=r"tiny.png is 64×20 px, smaller than 32 px"):
        images.read_gray_fitted(path, 64)
    Image.fromarray(np.zeros((32, 64, 3), dtype=np.uint8)).save(path)
    assert images.read_gray_fitted(path, 64).shape == (64, 64)


def test_luma_is_the_bt601_sum_in_a_fixed_order_not_a_matmul():
    rgb = np.random.default_rng(3).random((17, 19, 3)).astype(np.float32)
    r, g, b = (np.float32(w) for w in (0.299, 0.587, 0.114))
    expected = np.clip((rgb[..., 0] * r + rgb[..., 1] * g) + rgb[..., 2] * b, 0, 1)
    np.testing.assert_array_equal(images.luma(rgb), expected)


def test_area_downsample_is_the_block_mean():
    x = np.random.default_rng(4).random((2, 8, 12, 3)).astype(np.float32)
    for factor in (1, 2, 4):
        blocks = x.astype(np.float64).reshape(2, 8 // factor, factor, 12 // factor, factor, 3)
        expected = blocks.mean(axis=(2, 4))
        np.testing.assert_allclose(images.area_downsample(x, factor), expected, atol=1e-12)
    with pytest.raises(ValueError, match="blocks"):
        images.area_downsample(x[:, :7], 2)


def test_read_fitted_gives_channels_last(tmp_path):
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 50, 3), np.uint8)).save(
        tmp_path / "c.png"
    )
    assert images.read_fitted(tmp_path / "c.png", 32, 1).shape == (32, 32, 1)
    assert images.read_fitted(tmp_path / "c.png", 32, 3).shape == (32, 32, 3)

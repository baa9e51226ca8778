"""Decoding turns every PIL mode into RGB; crops follow torchvision's geometry."""

import io

import numpy as np
import pytest
from PIL import Image

from vitpod.data import transforms


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt,pixel,rgb", [
    ("L", "PNG", 100, (100, 100, 100)),
    ("LA", "PNG", (100, 7), (100, 100, 100)),
    ("RGBA", "PNG", (10, 20, 30, 0), (10, 20, 30)),
    ("CMYK", "JPEG", (0, 0, 0, 0), (255, 255, 255)),
    ("I;16", "PNG", 65535, (255, 255, 255)),
    ("I;16", "PNG", 257 * 100, (100, 100, 100)),
    ("1", "PNG", 1, (255, 255, 255)),
])
def test_every_mode_decodes_to_rgb(mode, fmt, pixel, rgb):
    out = transforms.decode_rgb(_encode(Image.new(mode, (4, 3), pixel), fmt))
    assert out.mode == "RGB" and out.size == (4, 3)
    assert np.abs(np.asarray(out).astype(int) - rgb).max() <= 2  # JPEG rounding


def test_palette_image_with_transparency_decodes_to_its_colours():
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.info["transparency"] = 0
    out = transforms.decode_rgb(_encode(img))
    assert tuple(np.asarray(out)[0, 0]) == (200, 100, 50)


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_corrupt_empty_and_truncated_files_raise(data):
    if data is None:  # a truncated PNG
        data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    with pytest.raises((OSError, SyntaxError, ValueError)):  # what PIL raises for these
        transforms.decode_rgb(data)


def test_random_resized_crop_box_stays_inside_and_respects_scale(rng):
    for _ in range(200):
        left, top, right, bottom = transforms.random_resized_crop_box(
            50, 30, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30


def test_random_resized_crop_falls_back_to_a_central_crop_for_extreme_shapes(rng):
    # A 1000x10 strip: no sampled box fits, torchvision's fallback clamps the ratio.
    box = transforms.random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng)
    assert box == (493, 0, 506, 10)  # w = round(10 * 4/3) = 13, left = (1000 - 13) // 2


def test_train_transform_is_deterministic_for_a_seed():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    a = transforms.train_transform(img, 16, (0.08, 1), (0.75, 1.33), True,
                                   np.random.default_rng(5))
    b = transforms.train_transform(img, 16, (0.08, 1), (0.75, 1.33), True,
                                   np.random.default_rng(5))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_eval_transform_resizes_the_shorter_side_and_crops_the_centre():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 30:50] = 255  # a white band in the middle of a wide image
    out = transforms.eval_transform(Image.fromarray(arr), 20, crop_pct=1.0)
    # Shorter side 40 -> 20 (factor 2), width 80 -> 40, centre 20 columns = source 20..60.
    assert out.shape == (20, 20, 3)
    assert out[:, 6:14].min() == 255 and out[:, :4].max() == 0 and out[:, 16:].max() == 0


def _jpeg(width, height, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * (c + 1) + y) % 256 for c in range(3)], -1).astype(np.float64)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_reduced_decode_picks_the_smallest_dct_scale_that_still_covers_the_output():
    img = transforms.open_image(_jpeg(2000, 1600))
    box = transforms.draft(img, (0, 0, 2000, 1600), 292, 256)  # eval: shorter side to 256
    assert img.size == (500, 400)  # 1/4: 1/8 (250 x 200) would not cover 292 x 256
    assert box == (0.0, 0.0, 500.0, 400.0)
    small = transforms.open_image(_jpeg(2000, 1600))
    assert transforms.draft(small, (100, 100, 400, 400), 224, 224) == (100, 100, 400, 400)
    assert small.size == (2000, 1600)  # a 300 px box at 1/2 would be under 224: full size


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reduced_decode_keeps_the_output_and_its_randomness(mode):
    data = _jpeg(1800, 2400)

    def run(reduced):
        img, rng = transforms.open_image(data), np.random.default_rng(7)
        if mode == "train":
            out = transforms.train_transform(img, 64, (0.5, 1), (3 / 4, 4 / 3), True, rng,
                                             reduced=reduced)
        else:
            out = transforms.eval_transform(img, 64, 0.875, reduced=reduced)
        return out, rng.random()

    (full, after_full), (reduced, after_reduced) = run(False), run(True)
    again, _ = run(True)
    assert reduced.shape == full.shape == (64, 64, 3) and reduced.dtype == np.uint8
    np.testing.assert_array_equal(reduced, again)  # deterministic
    assert after_full == after_reduced  # the same random draws: same crop box, same flip
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 6  # the same picture


def test_reduced_decode_changes_nothing_when_no_scale_fits():
    data = _jpeg(256, 256)  # eval at 224 / 0.875 = 256: scale 1
    full = transforms.eval_transform(transforms.open_image(data), 224, 0.875)
    reduced = transforms.eval_transform(transforms.open_image(data), 224, 0.875, reduced=True)
    np.testing.assert_array_equal(reduced, full)

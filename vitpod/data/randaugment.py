"""RandAugment (Cubuk et al. 2019) on PIL images, in the grain workers.

Each of `num_ops` layers picks one op uniformly and applies it with probability 0.5 (as
TF's reference, big_vision and timm do) at `magnitude` in 0..10; signed ops flip their sign
at random. Magnitudes follow timm's "increasing" variants, where a larger magnitude is
always a stronger change (TF's Solarize and Posterize weaken as the level grows). All draws
come from the example's generator, so the output is a pure function of (seed, position).
"""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)  # what geometric ops expose


def _signed(rng: np.random.Generator, value: float) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


def _solarize_add(img: Image.Image, amount: int) -> Image.Image:
    arr = np.asarray(img, np.int16)
    added = np.clip(arr + amount, 0, 255)
    return Image.fromarray(np.where(arr < 128, added, arr).astype(np.uint8))


# name -> f(img, m in [0, 1], rng)
OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(rng, 30 * m), resample=Image.BILINEAR,
                                             fillcolor=FILL),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, 8 - int(4 * m)),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(256 * m)),
    "SolarizeAdd": lambda img, m, rng: _solarize_add(img, int(110 * m)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1 + _signed(rng, 0.9 * m)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1 + _signed(rng, 0.9 * m)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(
        1 + _signed(rng, 0.9 * m)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(
        1 + _signed(rng, 0.9 * m)),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(rng, 0.3 * m), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(rng, 0.3 * m), 1, 0)),
    "TranslateX": lambda img, m, rng: _affine(
        img, (1, 0, _signed(rng, 0.45 * m) * img.width, 0, 1, 0)),
    "TranslateY": lambda img, m, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(rng, 0.45 * m) * img.height)),
}
NAMES = tuple(OPS)


def randaugment(img: Image.Image, num_ops: int, magnitude: float,
                rng: np.random.Generator) -> Image.Image:
    """`num_ops` random ops at `magnitude` (0..10), each applied with probability 0.5."""
    for _ in range(num_ops):
        name = NAMES[rng.integers(len(NAMES))]
        if rng.random() < 0.5:
            img = OPS[name](img, magnitude / 10.0, rng)
    return img

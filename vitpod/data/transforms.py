"""Decode any image file to RGB and apply train/eval geometry, as torchvision does.

Outputs stay uint8 (H, W, 3): workers ship 4x fewer bytes and normalisation runs on device.
"""

import io
import math

import numpy as np
from PIL import Image

from vitpod.data import randaugment

# Pillow's decompression-bomb check is process-wide: it warns on every image above its limit
# and refuses those above twice that, whatever a run's config says. open_image checks the
# run's own limit (data.max_image_pixels) from the header instead, before anything is decoded.
Image.MAX_IMAGE_PIXELS = None
MAX_PIXELS = 89_478_485  # Pillow's default limit: 256 MiB decoded as RGB


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image's header only: size and format, nothing decoded yet. ValueError when it has
    more than `max_pixels` pixels (0: no limit): a small file that would decode to gigabytes
    (a decompression bomb) is refused, and training skips it like a corrupt file."""
    img = Image.open(io.BytesIO(data))
    if max_pixels and img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} pixels, over the limit of {max_pixels} "
                         "(data.max_image_pixels)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode (as drafted) to RGB. Raises on corrupt, truncated or empty data."""
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping at 255 (PIL's convert does).
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy an RGB image


def decode_rgb(data: bytes) -> Image.Image:
    """Bytes of any format PIL reads -> RGB image at full size."""
    return to_rgb(open_image(data))


def draft(img: Image.Image, box, need_w: int, need_h: int):
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling, before anything is decoded)
    when `box` of the full image still has at least need_w x need_h pixels there; returns the
    box in the decoded image's coordinates. Other formats decode at full size, box unchanged."""
    if img.format != "JPEG":
        return box
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    k = max(k for k in (1, 2, 4, 8) if k == 1 or (box_w / k >= need_w and box_h / k >= need_h))
    if k == 1:
        return box
    width, height = img.size
    img.draft(img.mode, (math.ceil(width / k), math.ceil(height / k)))
    sx, sy = img.width / width, img.height / height
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def random_resized_crop_box(width: int, height: int, scale, ratio,
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params as a PIL box (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: central crop with the ratio clamped
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def train_transform(img: Image.Image, size: int, scale, ratio, hflip: bool,
                    rng: np.random.Generator, randaug: tuple[int, float] = (0, 0),
                    reduced: bool = False) -> np.ndarray:
    """Random resized crop, flip, then RandAugment (num_ops, magnitude) on the small image.
    `img` may be undecoded (open_image): the box is drawn from its header's size and, with
    `reduced`, a JPEG is decoded at the smallest DCT scale that keeps the box >= size."""
    box = random_resized_crop_box(img.width, img.height, scale, ratio, rng)
    if reduced:
        box = draft(img, box, size, size)
    out = to_rgb(img).resize((size, size), Image.BILINEAR, box=box)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if randaug[0]:
        out = randaugment.randaugment(out, randaug[0], randaug[1], rng)
    return np.asarray(out, dtype=np.uint8)


def eval_transform(img: Image.Image, size: int, crop_pct: float,
                   reduced: bool = False, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to size / crop_pct, then take the central size x size (with
    `reduced`, from a JPEG decoded at the smallest DCT scale still >= the resized size).
    `interpolation` "bicubic" resizes as timm's eval transform does by default."""
    short = int(math.floor(size / crop_pct))
    w, h = img.width, img.height
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    box = draft(img, (0, 0, w, h), new_w, new_h) if reduced else None
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    out = to_rgb(img).resize((new_w, new_h), resample, box=box)
    return np.asarray(out.crop((left, top, left + size, top + size)), dtype=np.uint8)

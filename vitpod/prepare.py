"""Make ImageFolder data sets.

    python -m vitpod.prepare digits --out=data/digits

`digits`: scikit-learn's 1,797 real 8x8 handwritten digits as greyscale PNGs in
OUT/train/<digit>/ and OUT/val/<digit>/, with a fixed stratified 80/20 split.
"""

import os

import numpy as np
from absl import flags
from PIL import Image

from vitpod import cli
from vitpod.errors import UserError


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("out", None, "Output directory of the ImageFolder.")


def digits(out: str, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the digits as OUT/{train,val}/<class>/<index>.png; returns images per split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.rint(data.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed,
                                          stratify=data.target)
    counts = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for i in sorted(idx):
            folder = os.path.join(out, split, str(data.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i], "L").save(os.path.join(folder, f"{i:04d}.png"))
        counts[split] = len(idx)
    return counts


SOURCES = {"digits": digits}


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in SOURCES or not flags.FLAGS.out:
        raise UserError(f"usage: python -m vitpod.prepare {{{'|'.join(SOURCES)}}} --out=DIR")
    counts = SOURCES[argv[1]](flags.FLAGS.out)
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {argv[1]} to {flags.FLAGS.out}: {summary}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

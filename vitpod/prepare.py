"""Make ImageFolder data sets.

    python -m vitpod.prepare digits --out=data/digits
    python -m vitpod.prepare hf --dataset=cifar10 --out=data/cifar10   # or a save_to_disk dir

`digits`: scikit-learn's 1,797 real 8x8 handwritten digits as greyscale PNGs in
OUT/train/<digit>/ and OUT/val/<digit>/, with a fixed stratified 80/20 split.
`hf`: a Hugging Face `datasets` image classification set (a hub name, or a local
`save_to_disk` directory) as OUT/<split>/<class name>/<index>.<ext>; its `test` or
`validation` split becomes `val`. Needs the `datasets` package (the `hf` extra).
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
    flags.DEFINE_string("dataset", None, "hf: a datasets hub name or save_to_disk directory.")


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


def hf_dataset(out: str, dataset: str) -> dict[str, int]:
    """Write every split of an HF image classification dataset as an ImageFolder."""
    import datasets
    from tqdm import tqdm

    try:
        data = (datasets.load_from_disk(dataset) if os.path.isdir(dataset)
                else datasets.load_dataset(dataset))
    except Exception as e:  # noqa: BLE001  offline, unknown name, not a dataset directory
        raise UserError(f"cannot load the dataset {dataset!r} ({type(e).__name__}: "
                        f"{str(e)[:120]}); pass a hub name, or a save_to_disk directory") from None
    splits = data if isinstance(data, datasets.DatasetDict) else {"train": data}
    counts = {}
    for split_name, split in splits.items():
        image_col = next((k for k, f in split.features.items() if isinstance(f, datasets.Image)),
                         None)
        label_col = next((k for k, f in split.features.items()
                          if isinstance(f, datasets.ClassLabel)), None)
        if image_col is None or label_col is None:
            raise UserError(f"dataset {dataset!r} split {split_name!r} needs an Image and a "
                            f"ClassLabel column; it has {dict(split.features)}")
        names = [n.replace(os.sep, "_") for n in split.features[label_col].names]
        target = "val" if split_name in ("test", "validation", "valid") else split_name
        for i, row in enumerate(tqdm(split, desc=f"{dataset} {split_name}", unit="img")):
            img = row[image_col]
            ext = "jpg" if (img.format or "").upper() == "JPEG" else "png"
            folder = os.path.join(out, target, names[row[label_col]])
            os.makedirs(folder, exist_ok=True)
            img.save(os.path.join(folder, f"{i:07d}.{ext}"))
        counts[target] = len(split)
    return counts


SOURCES = {"digits": digits, "hf": hf_dataset}


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in SOURCES or not flags.FLAGS.out:
        raise UserError(f"usage: python -m vitpod.prepare {{{'|'.join(SOURCES)}}} --out=DIR")
    if argv[1] == "hf":
        if not flags.FLAGS.dataset:
            raise UserError("pass --dataset=NAME_OR_DIR (a hub name or a save_to_disk directory)")
        counts = hf_dataset(flags.FLAGS.out, flags.FLAGS.dataset)
    else:
        counts = digits(flags.FLAGS.out)
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {argv[1]} to {flags.FLAGS.out}: {summary}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Make ImageFolder data sets.

    python -m vitpod.prepare digits --out=data/digits
    python -m vitpod.prepare hf --dataset=cifar10 --out=data/cifar10   # or a save_to_disk dir

`digits`: scikit-learn's 1,797 real 8x8 handwritten digits as greyscale PNGs in
OUT/train/<digit>/ and OUT/val/<digit>/, with a fixed stratified 80/20 split.
`hf`: a Hugging Face `datasets` image classification set (a hub name, or a local
`save_to_disk` directory) as OUT/<split>/<class name>/<index>.<ext>; its `test` or
`validation` split becomes `val`. Needs the `datasets` package (the `hf` extra).

    python -m vitpod.prepare upload --src=data/digits --dst=gs://BUCKET/digits

`upload`: copy a local ImageFolder (or any folder) to a bucket in parallel, skipping
objects already there with the same size and MD5, so a rerun finishes an interrupted copy.
Hidden files and links leading out of --src stay behind, named in a warning
(--follow_links_out uploads what such links point to).

    python -m vitpod.prepare pack --src=data/digits/train --dst=gs://BUCKET/digits/train

`pack`: an ImageFolder (local or gs://) as ArrayRecord shards of about --shard_mb, local or
gs://, which data.train_dir / data.val_dir / evaluate --data_dir read like the ImageFolder
(vitpod/data/packing.py; with data.shuffle=blocks a bucket serves a run of images per request).
"""

import os
import sys
import time

import numpy as np
from absl import flags
from PIL import Image

from vitpod import cli
from vitpod.data import packing
from vitpod.errors import UserError
from vitpod.upload import upload_tree


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("out", None, "Output directory of the ImageFolder.")
    flags.DEFINE_string("dataset", None, "hf: a datasets hub name or save_to_disk directory.")
    flags.DEFINE_string("src", None, "upload: the local folder to copy; pack: the ImageFolder.")
    flags.DEFINE_string("dst", None, "upload: where to copy it, gs://BUCKET/PATH; pack: where "
                        "the shards go, a local folder or gs://BUCKET/PATH.")
    flags.DEFINE_integer("threads", 32, "upload: files copied at once; pack: shards at once.")
    flags.DEFINE_float("shard_mb", 128, "pack: about how many MiB each shard holds.")
    flags.DEFINE_bool("follow_links_out", False, "upload: also upload what links leading out "
                      "of --src point to (by default they are named and left out).")


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
    columns = {}  # every split checked before anything is written
    for split_name, split in splits.items():
        image_col = next((k for k, f in split.features.items() if isinstance(f, datasets.Image)),
                         None)
        label_col = next((k for k, f in split.features.items()
                          if isinstance(f, datasets.ClassLabel)), None)
        if image_col is None or label_col is None:
            raise UserError(f"dataset {dataset!r} split {split_name!r} needs an Image and a "
                            f"ClassLabel column; it has {dict(split.features)}")
        _check_class_names(dataset, split.features[label_col].names)
        columns[split_name] = image_col, label_col
    counts = {}
    for split_name, split in splits.items():
        image_col, label_col = columns[split_name]
        names = split.features[label_col].names
        target = "val" if split_name in ("test", "validation", "valid") else split_name
        for i, row in enumerate(tqdm(split, desc=f"{dataset} {split_name}", unit="img")):
            img = row[image_col]
            ext = "jpg" if (img.format or "").upper() == "JPEG" else "png"
            folder = os.path.join(out, target, names[row[label_col]])
            os.makedirs(folder, exist_ok=True)
            img.save(os.path.join(folder, f"{i:07d}.{ext}"))
        counts[target] = len(split)
    return counts


NAME_MAX = 255  # bytes in one file or folder name on Linux file systems (ext4, xfs, ...)


def _check_class_names(dataset: str, names: list[str]) -> None:
    """UserError for the first class name that cannot be one folder of OUT/split."""
    bad = [n for n in names if not _plain_folder_name(n)]
    if bad:
        raise UserError(f"dataset {dataset!r} has class name {bad[0]!r}, not a plain folder "
                        "name (empty, '.' or '..', leading '.', or a '/' or '\\' in it); "
                        "rename its classes first (datasets' ClassLabel names)")
    long = [n for n in names if len(n.encode()) > NAME_MAX]
    if long:
        raise UserError(f"dataset {dataset!r} has a class name of {len(long[0].encode())} "
                        f"bytes ({long[0][:40]!r}...), more than the {NAME_MAX} a folder name "
                        "may have; rename its classes first (datasets' ClassLabel names)")


def _plain_folder_name(name: str) -> bool:
    """A class name that is one visible folder: no path out of OUT/split, no hidden class."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def upload(src: str, dst: str, threads: int = 32,
           follow_links_out: bool = False) -> dict[str, int]:
    """Copy src to gs://dst (see the module doc), with a progress line on a terminal."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() and (time.monotonic() - last[0] > 0.5 or done == total):
            last[0] = time.monotonic()
            print(f"\r{done}/{total} files", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    copied, skipped = upload_tree(src, dst, threads, progress, follow_links_out)
    return {"copied": copied, "already there": skipped}


SOURCES = {"digits": digits, "hf": hf_dataset, "upload": upload, "pack": packing.pack}


def main(argv) -> None:
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in SOURCES:
        unknown = f"unknown source {argv[1]!r}; " if len(argv) == 2 else ""
        raise UserError(f"{unknown}usage: python -m vitpod.prepare {{{'|'.join(SOURCES)}}} "
                        "--out=DIR (upload, pack: --src=DIR --dst=gs://BUCKET/PATH)")
    if argv[1] in ("upload", "pack"):
        if not (f.src and f.dst):
            raise UserError(f"{argv[1]} needs --src=DIR and --dst=DIR_OR_gs://BUCKET/PATH")
        counts, out = (upload(f.src, f.dst, f.threads, f.follow_links_out)
                       if argv[1] == "upload"
                       else packing.pack(f.src, f.dst, f.shard_mb, f.threads)), f.dst
    elif not f.out:
        raise UserError(f"pass --out=DIR (where the {argv[1]} ImageFolder is written)")
    elif argv[1] == "hf":
        if not f.dataset:
            raise UserError("pass --dataset=NAME_OR_DIR (a hub name or a save_to_disk directory)")
        counts, out = hf_dataset(f.out, f.dataset), f.out
    else:
        counts, out = digits(f.out), f.out
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"{argv[1]} to {out}: {summary}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

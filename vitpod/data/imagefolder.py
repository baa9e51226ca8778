"""Scan an ImageFolder tree into a manifest, with torchvision's rules.

Classes are the sorted names of the root's subfolders; every file below a class folder,
nested folders included, whose extension is one of torchvision's (case-insensitive) is an
example of that class. Hidden files and folders (leading '.') are ignored, which is where
we differ from torchvision, whose scan turns `.ipynb_checkpoints` into a class. Files are
listed class by class in parallel, which matters on gs:// where a listing is paged. Local
trees are walked once, following each link at most once and never back into the tree or
above it (storage.files_below): a link loop cannot multiply a class or hang the scan.
"""

import dataclasses
import json
import time

from absl import logging

from vitpod import storage
from vitpod.data import packed
from vitpod.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of an ImageFolder: files relative to `root`, labels index `classes`.
    A packed split (vitpod/data/packed.py) also names its shards."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    shards: tuple[str, ...] = ()
    shard_records: int = 0
    record_bytes: int = 0  # mean bytes per record: sizes a read of several

    def path(self, i: int) -> str:
        return storage.join(self.root, self.files[i])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Split":
        return cls(d["root"], tuple(d["classes"]), tuple(d["files"]), tuple(d["labels"]),
                   tuple(d.get("shards", ())), d.get("shard_records", 0),
                   d.get("record_bytes", 0))


def _visible(name: str) -> bool:
    return not name.startswith(".")


def is_image(relative_path: str) -> bool:
    """An image file by torchvision's extensions, with no hidden part in its path."""
    return (relative_path.lower().endswith(IMG_EXTENSIONS)
            and all(map(_visible, relative_path.split("/"))))


def scan(root: str, role: str = "train") -> Split:
    """Scan `root` (the `role` split) into a Split; UserError if it cannot be trained on.
    A packed dataset (packed.json in `root`) is read from its index instead."""
    started = time.perf_counter()
    if packed.is_packed(root):
        index = packed.load_index(root)
        return Split(root, tuple(index["classes"]), tuple(index["files"]),
                     tuple(index["labels"]), tuple(index["shards"]), index["shard_records"],
                     index["record_bytes"])
    if not storage.isdir(root):
        raise UserError(f"data dir {root!r} ({role}) does not exist or is not a directory; "
                        f"set --config.data.{role}_dir to an ImageFolder (one folder per class)")
    classes = [c for c in storage.subdirs(root) if _visible(c)]
    if not classes and storage.exists(storage.join(root, packed.PLAN)):
        raise UserError(f"data dir {root!r} ({role}) is a pack that did not finish "
                        f"({packed.PLAN} but no {packed.INDEX}); rerun the same `python -m "
                        f"vitpod.prepare pack` with --dst={root} to finish it (it keeps the "
                        "shards already written)")
    if not classes:
        raise UserError(f"data dir {root!r} ({role}) has no class folders; an ImageFolder "
                        "holds one subfolder per class with the images inside")
    not_followed: list[str] = []
    if storage.is_gcs(root):
        listed = storage.parallel_map(lambda c: storage.files_below(storage.join(root, c)),
                                      classes)
    else:  # one walk, one seen-set: no loops, a file reached by two paths listed once
        per_class = {c: [] for c in classes}
        for rel in storage.files_below(root, hidden=False, skipped=not_followed):
            name, _, rest = rel.partition("/")
            if rest and name in per_class:
                per_class[name].append(rest)
        listed = [per_class[c] for c in classes]
    files, labels, empty, ignored = [], [], [], []
    for label, (name, below) in enumerate(zip(classes, listed, strict=True)):
        below = [f"{name}/{f}" for f in below if all(map(_visible, f.split("/")))]
        found = [f for f in below if is_image(f)]
        ignored += [f for f in below if not is_image(f)]
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise UserError(f"data dir {root!r} ({role}): class folder(s) {', '.join(empty)} hold "
                        f"no images ({'/'.join(IMG_EXTENSIONS)}); add images or remove them")
    if ignored:
        logging.warning("data dir %s: ignored %d non-image file(s), e.g. %s",
                        root, len(ignored), ignored[0])
    if not_followed:
        logging.warning("data dir %s: did not follow %d link(s) leading back into it or above "
                        "it, to a folder already listed, or nowhere: %s", root,
                        len(not_followed), ", ".join(not_followed[:5])
                        + (", ..." if len(not_followed) > 5 else ""))
    logging.info("listed %s (%s): %d files in %d classes in %.1f s", root, role, len(files),
                 len(classes), time.perf_counter() - started)
    return Split(root, tuple(classes), tuple(files), tuple(labels))


def check_same_classes(train: Split, val: Split) -> None:
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(
            f"val classes in {val.root!r} differ from train classes in {train.root!r}: "
            f"only in train {only_train or '-'}, only in val {only_val or '-'}; "
            "both splits need the same class folders")


def scan_splits(train_dir: str, val_dir: str) -> dict[str, Split]:
    """The run's manifest: the train split, and the val split when given (same classes)."""
    splits = {"train": scan(train_dir, "train")}
    if val_dir:
        splits["val"] = scan(val_dir, "val")
        check_same_classes(splits["train"], splits["val"])
    return splits


_SPLIT = {"root": str, "classes": [str], "files": [str], "labels": [int], "shards?": [str],
          "shard_records?": int, "record_bytes?": float}
MANIFEST_SHAPE = {"train": _SPLIT, "val?": _SPLIT}
MANIFEST_REMEDY = ("delete it and relaunch to scan the data again (files added or removed "
                   "since then change the batches)")


def load(manifest_path: str) -> dict[str, Split]:
    data = storage.read_json(manifest_path, MANIFEST_REMEDY, MANIFEST_SHAPE)
    for name in ("train", "val"):
        split = data.get(name) or {"files": [], "labels": [], "classes": []}
        labels = split["labels"]
        if len(split["files"]) != len(labels) or labels and not (
                0 <= min(labels) and max(labels) < len(split["classes"])):
            raise UserError(f"{manifest_path} is damaged (not what vitpod writes there: the "
                            f"{name} labels do not match its files and classes); "
                            f"{MANIFEST_REMEDY}")
    return {k: Split.from_json(data[k]) for k in ("train", "val") if k in data}


def save(manifest_path: str, splits: dict[str, Split]) -> None:
    storage.write_text(manifest_path, json.dumps({k: v.to_json() for k, v in splits.items()}))

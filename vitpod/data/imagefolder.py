"""Scan an ImageFolder tree into a manifest, with torchvision's rules.

Classes are the sorted names of the root's subfolders; every file below a class folder,
nested folders included, whose extension is one of torchvision's (case-insensitive) is an
example of that class. Hidden files and folders (leading '.') are ignored, which is where
we differ from torchvision, whose scan turns `.ipynb_checkpoints` into a class.
"""

import dataclasses
import json
import os

from absl import logging

from vitpod.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of an ImageFolder: files relative to `root`, labels index `classes`."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Split":
        return cls(d["root"], tuple(d["classes"]), tuple(d["files"]), tuple(d["labels"]))


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan(root: str, role: str = "train") -> Split:
    """Scan `root` (the `role` split) into a Split; UserError if it cannot be trained on."""
    if not os.path.isdir(root):
        raise UserError(f"data dir {root!r} ({role}) does not exist or is not a directory; "
                        f"set --config.data.{role}_dir to an ImageFolder (one folder per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if not classes:
        raise UserError(f"data dir {root!r} ({role}) has no class folders; an ImageFolder "
                        "holds one subfolder per class with the images inside")
    files, labels, empty, ignored = [], [], [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for f in sorted(filenames):
                if not _visible(f):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                (found if f.lower().endswith(IMG_EXTENSIONS) else ignored).append(rel)
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


def load(manifest_path: str) -> dict[str, Split]:
    with open(manifest_path) as f:
        return {k: Split.from_json(v) for k, v in json.load(f).items()}


def save(manifest_path: str, splits: dict[str, Split]) -> None:
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: v.to_json() for k, v in splits.items()}, f)
    os.replace(tmp, manifest_path)

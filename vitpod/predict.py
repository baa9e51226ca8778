"""Classify image files with a trained model.

    python -m vitpod.predict --model=runs/demo data/digits/val/3 [--top_k=3] [--format=json]

--model is a workdir, an exported directory, a Hugging Face ViT or timm `save_for_hf`
directory, or a big_vision / vision_transformer .npz file. An unreadable file gets its error
on its line; when no file could be read the exit code is 2.
"""

import json

import numpy as np
from absl import flags

from vitpod import cli, inference, storage
from vitpod.data import imagefolder, transforms
from vitpod.errors import UserError


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("model", None, "Workdir, or checkpoint: HF ViT or timm directory, .npz.")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    flags.DEFINE_enum("format", "text", ["text", "json"], "json: one object per line.")


_BATCH = 64


def image_files(paths: list[str]) -> list[str]:
    """Each path that is a file, and the images below each folder (local or gs://)."""
    files = []
    for path in paths:
        if storage.isdir(path):
            found = [storage.join(path, f) for f in storage.files_below(path)
                     if imagefolder.is_image(f)]
            if not found:
                raise UserError(f"no images below {path} (files ending in "
                                f"{'/'.join(imagefolder.IMG_EXTENSIONS)}, hidden ones skipped)")
            files += found
        elif storage.exists(path):
            files.append(path)
        else:
            raise UserError(f"no such file or directory: {path}")
    return files


def predict(classifier: inference.Classifier, files: list[str], top_k: int) -> list[dict]:
    """[{path, top_k: [{label, prob}]}] per file; unreadable files get an 'error' instead."""
    results, size = [], classifier.data_cfg.image_size
    for start in range(0, len(files), _BATCH):
        images, rows = [], []
        for path in files[start:start + _BATCH]:
            try:
                img = transforms.open_image(storage.read_bytes(path))
                images.append(transforms.eval_transform(
                    img, size, classifier.data_cfg.eval_crop_pct,
                    classifier.data_cfg.reduced_decode, classifier.data_cfg.eval_interpolation))
                rows.append({"path": path})
            except Exception as e:  # noqa: BLE001
                results.append({"path": path, "error": f"{type(e).__name__}: {e}"})
        if not images:
            continue
        logits = classifier.logits(np.stack(images))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for row, p in zip(rows, probs, strict=True):
            best = np.argsort(-p)[:top_k]
            row["top_k"] = [{"label": classifier.classes[i], "prob": round(float(p[i]), 6)}
                            for i in best]
            results.append(row)
    return results


def main(argv) -> None:
    if not flags.FLAGS.model or len(argv) < 2:
        raise UserError("usage: python -m vitpod.predict --model=DIR IMAGE_OR_DIR...")
    if flags.FLAGS.top_k < 1:
        raise UserError(f"--top_k={flags.FLAGS.top_k} must be >= 1")
    files = image_files(argv[1:])
    rows = predict(inference.load(flags.FLAGS.model), files, flags.FLAGS.top_k)
    for row in rows:
        if flags.FLAGS.format == "json":
            print(json.dumps(row))
        elif "error" in row:
            print(f"{row['path']}: {row['error']}")
        else:
            best = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in row["top_k"])
            print(f"{row['path']}: {best}")
    if all("error" in row for row in rows):
        raise UserError(f"none of the {len(rows)} file(s) could be read as an image (each "
                        "line above says why); pass image files")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Evaluate a trained model on any ImageFolder: accuracy, loss, top-5, per-class accuracy.

    python -m vitpod.evaluate --workdir=runs/demo --data_dir=data/digits/val

--workdir is a workdir, an exported directory, a Hugging Face ViT or timm `save_for_hf`
directory, or a big_vision / vision_transformer .npz file.
"""

import json

import numpy as np
from absl import flags

from vitpod import cli, inference
from vitpod.data import imagefolder, pipeline
from vitpod.errors import UserError


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("workdir", None, "Workdir, or checkpoint: HF ViT or timm directory, .npz.")
    flags.DEFINE_string("data_dir", None, "ImageFolder to evaluate on.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch.")


def evaluate(classifier: inference.Classifier, data_dir: str, batch_size: int) -> dict:
    split = imagefolder.scan(data_dir, "val")
    if split.classes != classifier.classes:
        raise UserError(f"classes of {data_dir!r} {list(split.classes)[:5]}... differ from the "
                        f"model's {list(classifier.classes)[:5]}...; evaluate on the same classes")
    loss, correct, top5, count = 0.0, 0, 0, 0
    per_class = np.zeros((len(split.classes), 2))  # correct, total
    for batch in pipeline.eval_batches(split, classifier.data_cfg, batch_size):
        keep = batch["valid"] == 1
        logits = classifier.logits(batch["image"])[keep].astype(np.float64)
        labels = batch["label"][keep]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
            -1, keepdims=True)) - logits.max(-1, keepdims=True)
        loss -= log_probs[np.arange(len(labels)), labels].sum()
        hits = logits.argmax(-1) == labels
        correct += int(hits.sum())
        ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)
        top5 += int((ranks < 5).sum())
        count += len(labels)
        np.add.at(per_class, labels, np.stack([hits, np.ones_like(hits)], -1))
    n = max(count, 1)
    return {"accuracy": correct / n, "loss": loss / n, "top5_accuracy": top5 / n,
            "count": count, "skipped": len(split.files) - count,
            "per_class_accuracy": {c: per_class[i, 0] / max(per_class[i, 1], 1)
                                   for i, c in enumerate(split.classes)}}


def main(argv) -> None:
    if not flags.FLAGS.workdir or not flags.FLAGS.data_dir:
        raise UserError("pass --workdir=DIR and --data_dir=IMAGEFOLDER")
    f = flags.FLAGS
    print(json.dumps(evaluate(inference.load(f.workdir), f.data_dir, f.batch_size), indent=1))


if __name__ == "__main__":
    define_flags()
    cli.run(main)

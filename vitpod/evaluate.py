"""Evaluate a trained model on any ImageFolder: accuracy, loss, top-5, per-class accuracy.

    python -m vitpod.evaluate --workdir=runs/demo --data_dir=data/digits/val

--workdir is a workdir, an exported directory, a Hugging Face ViT or timm `save_for_hf`
directory, or a big_vision / vision_transformer .npz file.
"""

import json

import jax
from absl import flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitpod import cli, evaluation, inference, steps, storage
from vitpod import config as config_lib
from vitpod import mesh as mesh_lib
from vitpod.data import imagefolder
from vitpod.errors import UserError


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("workdir", None, "Workdir, or checkpoint: HF ViT or timm directory, .npz.")
    flags.DEFINE_string("data_dir", None, "ImageFolder to evaluate on.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch (rounded up to a multiple of the "
                         "devices).")


def _check_flags(data_dir: str, batch_size: int) -> None:
    """Before the model loads: --data_dir named as such (not as a training key)."""
    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size} must be >= 1")
    if not storage.isdir(data_dir):
        raise UserError(f"--data_dir={data_dir} does not exist or is not a directory; pass an "
                        "ImageFolder (one folder per class) or a packed dataset")


def evaluate_classifier(classifier: inference.Classifier, data_dir: str,
                        batch_size: int) -> dict:
    """`classifier` on the ImageFolder or packed dataset `data_dir`, with training's sharded
    evaluation over all of this host's devices (params replicated, rows split): accuracy,
    loss, top-5, count, skipped and per-class accuracy."""
    _check_flags(data_dir, batch_size)
    split = imagefolder.scan(data_dir, "val")
    if split.classes != classifier.classes:
        raise UserError(f"classes of {data_dir!r} {list(split.classes)[:5]}... differ from the "
                        f"model's {list(classifier.classes)[:5]}...; evaluate on the same classes")
    devices = jax.device_count()
    global_batch = -(-batch_size // devices) * devices
    if global_batch != batch_size:
        logging.info("batch size %d rounded up to %d, a multiple of the %d devices", batch_size,
                     global_batch, devices)
    mesh = mesh_lib.make_mesh(config_lib.defaults().mesh)  # data parallel, any slices
    params = jax.device_put(classifier.params, NamedSharding(mesh, P()))
    eval_step = steps.make_eval_step(classifier.graphdef, mesh, classifier.data_cfg)
    return evaluation.eval_split(eval_step, params, split, classifier.data_cfg, global_batch,
                                 mesh)


def main(argv) -> None:
    if not flags.FLAGS.workdir or not flags.FLAGS.data_dir:
        raise UserError("pass --workdir=DIR and --data_dir=IMAGEFOLDER")
    f = flags.FLAGS
    _check_flags(f.data_dir, f.batch_size)
    print(json.dumps(evaluate_classifier(inference.load(f.workdir), f.data_dir, f.batch_size),
                     indent=1))


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Export a run's weights as a Hugging Face ViT directory that `transformers` loads.

    python -m vitpod.export --workdir=runs/demo --out=exported/demo

--workdir may also be a timm `save_for_hf` directory or a big_vision / vision_transformer
.npz file: the export converts it. An --out that holds files is refused unless --overwrite.
    # then: transformers.pipeline("image-classification", model="exported/demo")
"""

import errno

from absl import flags

from vitpod import cli, inference, storage
from vitpod.errors import UserError
from vitpod.formats import hf


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("workdir", None, "The run's workdir (its latest checkpoint), or a "
                        "checkpoint: HF ViT or timm directory, .npz.")
    flags.DEFINE_string("out", None, "Directory to write the HF model to.")
    flags.DEFINE_bool("overwrite", False, "Write over the files of an --out that is not empty.")


def run(workdir: str, out: str, overwrite: bool = False) -> str:
    """Export `workdir` (or a checkpoint) to `out`; returns what was exported."""
    if storage.exists(out) and not storage.isdir(out):
        raise UserError(f"--out={out} is a file; pass a directory for the HF model")
    if storage.exists(storage.join(out, "manifest.json")):
        raise UserError(f"--out={out} is a vitpod workdir (its config.json would be replaced); "
                        "pass another directory")
    there = storage.files_below(out) if storage.isdir(out) else []
    if there and not overwrite:
        raise UserError(f"--out={out} is not empty (it holds {', '.join(there[:3])}"
                        f"{', ...' if len(there) > 3 else ''}); pass --overwrite to write the "
                        "model over it, or choose another directory")
    classifier = inference.load(workdir)
    try:
        hf.export(classifier.params, classifier.model_cfg, classifier.data_cfg,
                  classifier.classes, out)
    except OSError as e:
        name = errno.errorcode.get(e.errno, "") if e.errno else ""
        raise UserError(f"cannot write the model to --out={out}: {e.strerror or e}"
                        f"{f' ({name})' if name else ''}; pass a directory this user can "
                        "create and write") from None
    return classifier.source


def main(argv) -> None:
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
        raise UserError("pass --workdir=DIR and --out=DIR")
    source = run(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.overwrite)
    print(f"exported {source} to {flags.FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

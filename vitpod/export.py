"""Export a run's weights as a Hugging Face ViT directory that `transformers` loads.

    python -m vitpod.export --workdir=runs/demo --out=exported/demo

--workdir may also be a timm `save_for_hf` directory or a big_vision / vision_transformer
.npz file: the export converts it.
    # then: transformers.pipeline("image-classification", model="exported/demo")
"""

from absl import flags

from vitpod import cli, inference, storage
from vitpod.errors import UserError
from vitpod.formats import hf


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    flags.DEFINE_string("workdir", None, "The run's workdir (its latest checkpoint), or a "
                        "checkpoint: HF ViT or timm directory, .npz.")
    flags.DEFINE_string("out", None, "Directory to write the HF model to.")


def run(workdir: str, out: str) -> str:
    """Export `workdir` (or a checkpoint) to `out`; returns what was exported."""
    if storage.exists(out) and not storage.isdir(out):
        raise UserError(f"--out={out} is a file; pass a directory for the HF model")
    if storage.exists(storage.join(out, "manifest.json")):
        raise UserError(f"--out={out} is a vitpod workdir (its config.json would be replaced); "
                        "pass another directory")
    classifier = inference.load(workdir)
    hf.export(classifier.params, classifier.model_cfg, classifier.data_cfg, classifier.classes,
              out)
    return classifier.source


def main(argv) -> None:
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
        raise UserError("pass --workdir=DIR and --out=DIR")
    source = run(flags.FLAGS.workdir, flags.FLAGS.out)
    print(f"exported {source} to {flags.FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

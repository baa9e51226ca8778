"""A trained classifier, from a workdir or any pretrained checkpoint: its model, params,
classes and preprocessing, and its logits for images (`predict`; `evaluate` runs its params
through evaluation.eval_split)."""

import dataclasses

import jax
import ml_collections
import numpy as np

from vitpod import checkpoint, config, config_record, model, steps, storage
from vitpod.data import imagefolder
from vitpod.errors import UserError
from vitpod.formats import common, detect, hf
from vitpod.workdir import files as workdir_files


@dataclasses.dataclass
class Classifier:
    model_cfg: ml_collections.ConfigDict
    data_cfg: ml_collections.ConfigDict  # image_size, mean, std, eval_crop_pct
    classes: tuple[str, ...]
    params: dict
    source: str

    def __post_init__(self):
        graphdef, _ = model.abstract_model(self.model_cfg, self.data_cfg.image_size,
                                           len(self.classes))
        self.graphdef = graphdef  # for the sharded eval step (evaluate)
        mean, std = self.data_cfg.mean, self.data_cfg.std
        self._logits = jax.jit(lambda p, u8: model.apply(graphdef, p,
                                                         steps.normalize(u8, mean, std)))

    def logits(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images, already transformed -> float32 (N, classes) logits."""
        return np.asarray(self._logits(self.params, images_u8))


def load(path: str) -> Classifier:
    """A workdir (latest checkpoint), or a checkpoint `detect.read` takes: an HF ViT or
    timm directory, or a big_vision / vision_transformer .npz."""
    if storage.isdir(storage.join(path, "checkpoints")):
        return _from_workdir(path)
    if storage.exists(storage.join(path, "manifest.json")):  # a run with no checkpoint yet
        raise UserError(f"no checkpoint in {storage.join(path, 'checkpoints')}; train first "
                        "(python -m vitpod.train)")
    if path.endswith(".npz") or storage.exists(storage.join(path, common.CONFIG)):
        return _from_checkpoint(detect.read(path))
    raise UserError(f"{path!r} is neither a vitpod workdir (with checkpoints/), a checkpoint "
                    "directory (config.json: Hugging Face ViT or timm save_for_hf) nor a "
                    "big_vision / vision_transformer .npz file")


def _from_workdir(workdir: str) -> Classifier:
    recorded = workdir_files.read_config(workdir)  # shape-checked: one line if damaged
    if recorded is None:
        raise UserError(f"{storage.join(workdir, 'config.json')} is missing: it records the "
                        "run's model and classes; put it back, or export from another workdir")
    cfg = config_record.from_json(recorded)
    classes = tuple(recorded.get(config_record.CLASSES_KEY) or imagefolder.load(  # older runs: the
        storage.join(workdir, "manifest.json"))["train"].classes)  # manifest's
    step, params = checkpoint.load_params(storage.join(workdir, "checkpoints"))
    return Classifier(cfg.model, cfg.data, classes, params, f"{workdir} step {step}")


def _from_checkpoint(ckpt: common.Checkpoint) -> Classifier:
    if not ckpt.labels:
        raise UserError(f"{ckpt.path} has no classifier head of its own; fine-tune it "
                        "(model.init_from) to predict with it")
    cfg = config.defaults()
    cfg.model.update(ckpt.model)
    cfg.data.update(ckpt.data)
    cfg.data.reduced_decode = False  # full-size decodes, as transformers' and timm's
    params = hf.load_params(ckpt, cfg.model, cfg.data.image_size, ckpt.labels)
    return Classifier(cfg.model, cfg.data, ckpt.labels, params, ckpt.path)

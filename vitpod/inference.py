"""A trained classifier, from a workdir or a Hugging Face ViT directory, for prediction."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitpod import checkpoint, config, hf, model, storage
from vitpod.data import imagefolder
from vitpod.errors import UserError


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
        mean = jnp.asarray(self.data_cfg.mean, jnp.float32)
        std = jnp.asarray(self.data_cfg.std, jnp.float32)
        self._logits = jax.jit(lambda p, u8: model.apply(
            graphdef, p, (u8.astype(jnp.float32) / 255.0 - mean) / std))

    def logits(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images, already transformed -> float32 (N, classes) logits."""
        return np.asarray(self._logits(self.params, images_u8))


def load(path: str) -> Classifier:
    """A workdir (latest checkpoint) or a directory with config.json + model.safetensors."""
    if storage.isdir(storage.join(path, "checkpoints")):
        return _from_workdir(path)
    if storage.exists(storage.join(path, hf.WEIGHTS)):
        return _from_hf(path)
    raise UserError(f"{path!r} is neither a vitpod workdir (with checkpoints/) nor a Hugging "
                    "Face ViT directory (with model.safetensors)")


def _from_workdir(workdir: str) -> Classifier:
    cfg = config.from_json(json.loads(storage.read_text(storage.join(workdir, "config.json"))))
    classes = imagefolder.load(storage.join(workdir, "manifest.json"))["train"].classes
    step, params = checkpoint.load_params(storage.join(workdir, "checkpoints"))
    return Classifier(cfg.model, cfg.data, classes, params, f"{workdir} step {step}")


def _from_hf(path: str) -> Classifier:
    hf_cfg = json.loads(storage.read_text(storage.join(path, hf.CONFIG)))
    cfg = config.defaults()
    cfg.model.variant = hf.variant_of(hf_cfg, path)
    cfg.model.layer_norm_eps = hf_cfg.get("layer_norm_eps", 1e-12)
    cfg.data.image_size = hf_cfg.get("image_size", 224)
    cfg.data.eval_crop_pct = 1.0
    cfg.data.reduced_decode = False  # full-size decodes, as transformers' processor does
    processor = storage.join(path, "preprocessor_config.json")
    if storage.exists(processor):
        pre = json.loads(storage.read_text(processor))
        cfg.data.mean, cfg.data.std = tuple(pre["image_mean"]), tuple(pre["image_std"])
    id2label = hf_cfg.get("id2label") or {"0": "0"}
    classes = tuple(id2label[str(i)] for i in range(len(id2label)))
    params = hf.load_params(path, cfg.model, cfg.data.image_size, classes)
    return Classifier(cfg.model, cfg.data, classes, params, path)


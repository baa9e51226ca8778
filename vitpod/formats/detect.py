"""Pretrained ViTs of three kinds, read into one form, and the run's config fitted to them.

`read` takes a Hugging Face ViT directory (or hub id), a timm `save_for_hf` directory, or a
big_vision / vision_transformer `.npz` file (local or gs://) and returns a
`common.Checkpoint`: the architecture as model.* keys, labels, eval preprocessing, and
tensors under HF ViT names, so that one importer (`hf.load_params`) does head replacement
and position-embedding resizing for all of them.
"""

import json

from absl import logging

from vitpod import storage
from vitpod.errors import UserError
from vitpod.formats import common, hf, npz, timm


def read(path: str) -> common.Checkpoint:
    """The checkpoint at `path`, whatever its kind (UserError naming the path if none)."""
    if path.endswith(".npz"):
        return npz.read(path)
    path = hf.resolve(path)
    config_path = storage.join(path, common.CONFIG)
    if not storage.exists(config_path):
        raise UserError(f"{path}: no {common.CONFIG}; vitpod reads Hugging Face ViT and timm "
                        "save_for_hf directories (config.json + weights) and big_vision / "
                        "vision_transformer .npz files")
    try:
        config = json.loads(storage.read_text(config_path))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if "architecture" in config:  # timm's save_for_hf; HF's says "architectures"
        return timm.read(path, config)
    return hf.read(path, config)


def adopt(model_cfg, ckpt: common.Checkpoint) -> None:
    """Set the architecture keys of `model_cfg` to the checkpoint's, saying in one warning
    line which keys the config had otherwise."""
    changed = common.differences(ckpt.model, model_cfg)
    if changed:
        logging.warning("model.init_from=%s fixes the architecture: %s", ckpt.path,
                        ", ".join(changed))
    model_cfg.update(ckpt.model)

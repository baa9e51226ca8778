"""The common form of every pretrained checkpoint vitpod reads.

HF ViT's tensor names are the common form: the Hugging Face, timm and big_vision readers
(hf.py, timm.py, npz.py; detect.py picks one) each return a `Checkpoint` in these names, and
one importer (`hf.load_params`) maps it onto vitpod's ViT. A checkpoint fixes the model keys
in `ARCH_KEYS`; `arch` spells them for the class-token ViTs every format holds.
"""

import dataclasses
from collections.abc import Callable

from vitpod import model

# An HF-style directory: config.json and the weights beside it (timm's save_for_hf too).
WEIGHTS, CONFIG = "model.safetensors", "config.json"
ARCH_KEYS = ("variant", "layer_norm_eps", "gelu", "pool", "posemb")  # what a checkpoint fixes


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A pretrained ViT of any supported kind, in HF ViT's terms."""

    path: str
    model: dict  # the model.* keys its architecture fixes (ARCH_KEYS)
    labels: tuple[str, ...]  # its head's classes ("0".."N-1" when unnamed); () for no head
    data: dict  # its eval preprocessing: data.image_size, mean, std, eval_crop_pct
    tensors: Callable[[], dict]  # HF ViT names without "vit.", PyTorch layouts, on demand


def arch(shape: model.ViTShape, layer_norm_eps: float, gelu: str) -> dict:
    """The model.* keys of a class-token ViT with learned position embeddings."""
    return {"variant": model.variant_name(shape), "layer_norm_eps": layer_norm_eps,
            "gelu": gelu, "pool": "cls", "posemb": "learn"}


def differences(theirs: dict, model_cfg) -> list[str]:
    """'model.KEY=checkpoint value (config: value)' for each architecture key that differs."""
    out = []
    for key, value in theirs.items():
        ours = model_cfg[key]
        same = (model.parse_variant(ours) == model.parse_variant(value) if key == "variant"
                else ours == value)
        if not same:
            out.append(f"model.{key}={value!r} (config: {ours!r})")
    return out

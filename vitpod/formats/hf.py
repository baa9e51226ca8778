"""Hugging Face ViT checkpoints in and out: `config.json` + `model.safetensors`.

HF ViT's tensor names are also the common form of every import (formats/common.py): the
timm and big_vision readers return a `Checkpoint` in these names, and `load_params` here
imports any of them. Names map one to one onto vitpod's ViT (see `_hf_names`). Importing
checks every shape, reports missing and unexpected tensors in one message, gives a zero
head when the classes differ, and resizes position embeddings with the bicubic interpolation HF's
`interpolate_pos_encoding` uses. Exporting writes a directory that `transformers` loads,
with the run's class names and preprocessing.
"""

import json
import os
import shutil

import numpy as np
import safetensors.numpy
from absl import logging

from vitpod import model, storage
from vitpod.errors import UserError
from vitpod.formats.common import CONFIG, WEIGHTS, Checkpoint, arch, differences


def _hf_names(num_layers: int) -> dict[tuple, tuple[str, str]]:
    """vitpod param path -> (HF tensor name, how to convert: 'T' transpose, 'conv', '')."""
    names = {("cls_token",): ("embeddings.cls_token", ""),
             ("pos_embed",): ("embeddings.position_embeddings", ""),
             ("patch_embed", "kernel"): ("embeddings.patch_embeddings.projection.weight", "conv"),
             ("patch_embed", "bias"): ("embeddings.patch_embeddings.projection.bias", ""),
             ("norm", "scale"): ("layernorm.weight", ""),
             ("norm", "bias"): ("layernorm.bias", ""),
             ("head", "kernel"): ("classifier.weight", "T"),
             ("head", "bias"): ("classifier.bias", "")}
    ours = {("attn", "query"): "attention.attention.query",
            ("attn", "key"): "attention.attention.key",
            ("attn", "value"): "attention.attention.value",
            ("attn", "out"): "attention.output.dense",
            ("mlp", "fc1"): "intermediate.dense",
            ("mlp", "fc2"): "output.dense"}
    for i in range(num_layers):
        hf = f"encoder.layer.{i}"
        for path, name in ours.items():
            names[("blocks", i, *path, "kernel")] = (f"{hf}.{name}.weight", "T")
            names[("blocks", i, *path, "bias")] = (f"{hf}.{name}.bias", "")
        for norm, hf_norm in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            names[("blocks", i, norm, "scale")] = (f"{hf}.{hf_norm}.weight", "")
            names[("blocks", i, norm, "bias")] = (f"{hf}.{hf_norm}.bias", "")
    return names


def _to_vitpod(array: np.ndarray, how: str) -> np.ndarray:
    if how == "T":
        return array.T
    if how == "conv":  # torch (out, in, kh, kw) -> flax (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    return array


def _to_hf(array: np.ndarray, how: str) -> np.ndarray:
    if how == "conv":
        return array.transpose(3, 2, 0, 1)
    return _to_vitpod(array, how)


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """torch's bicubic resize (align_corners=False, a=-0.75, clamped borders) as a matrix."""
    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += w(k - t)
    return m


def resize_pos_embed(pos_1nd: np.ndarray, grid: int) -> np.ndarray:
    """(1, 1 + g*g, D) learned embeddings -> (1, 1 + grid*grid, D), as HF interpolates."""
    cls_1d, patch_nd = pos_1nd[:, :1], pos_1nd[0, 1:]
    old = int(round(np.sqrt(patch_nd.shape[0])))
    m = _bicubic_matrix(old, grid)
    patch_ggd = np.einsum("ih,jw,hwd->ijd", m, m, patch_nd.reshape(old, old, -1).astype(np.float64))
    return np.concatenate([cls_1d, patch_ggd.reshape(1, grid * grid, -1).astype(pos_1nd.dtype)], 1)


def resolve(init_from: str) -> str:
    """A local checkpoint directory for `init_from` (a directory, or a hub id to download)."""
    if storage.is_gcs(init_from) or os.path.isdir(init_from):
        return init_from
    if init_from.count("/") != 1 or init_from.startswith((".", "/")):
        raise UserError(f"{init_from!r} is neither a checkpoint directory, a .npz file nor a "
                        "Hugging Face hub id like 'google/vit-base-patch16-224'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(init_from, allow_patterns=[CONFIG, WEIGHTS])
    except Exception as e:  # noqa: BLE001  offline, unknown id, no access
        raise UserError(f"cannot download {init_from!r} from the Hugging Face hub "
                        f"({type(e).__name__}); without internet, download it elsewhere and "
                        "pass the directory holding config.json and model.safetensors as "
                        "model.init_from") from None


_GELU = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, patch_size=16, image_size=224, num_channels=3,
                    layer_norm_eps=1e-12, hidden_act="gelu", qkv_bias=True, model_type="vit")


def read(path: str, hf_cfg: dict) -> Checkpoint:
    """An HF ViT directory (config.json already parsed) as a Checkpoint."""
    c = {**_HF_DEFAULTS, **hf_cfg}
    problems = []
    if c["model_type"] != "vit":
        problems.append(f"model_type={c['model_type']!r} (vitpod reads 'vit')")
    if c["hidden_act"] not in _GELU:
        problems.append(f"hidden_act={c['hidden_act']!r} (vitpod has {', '.join(_GELU)})")
    if not c["qkv_bias"]:
        problems.append("qkv_bias=false (vitpod has biases)")
    if c["num_channels"] != 3:
        problems.append(f"num_channels={c['num_channels']} (vitpod reads RGB)")
    if problems:
        raise UserError(f"{storage.join(path, CONFIG)}: unsupported " + "; ".join(problems))
    shape = model.ViTShape(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                           c["intermediate_size"], c["patch_size"])
    data = {"image_size": c["image_size"], "eval_crop_pct": 1.0}  # HF resizes, no crop
    processor = storage.join(path, "preprocessor_config.json")
    if storage.exists(processor):
        pre = json.loads(storage.read_text(processor))
        data.update(mean=tuple(pre["image_mean"]), std=tuple(pre["image_std"]))
    id2label = c.get("id2label") or {}
    has_head = "ViTForImageClassification" in (c.get("architectures") or
                                                ["ViTForImageClassification"])
    labels = tuple(id2label[str(i)] for i in range(len(id2label))) if has_head else ()

    def tensors():
        raw = safetensors.numpy.load(storage.read_bytes(storage.join(path, WEIGHTS)))
        return {k.removeprefix("vit."): v for k, v in raw.items()
                if not k.startswith(("pooler.", "vit.pooler."))}  # HF classifiers skip it

    return Checkpoint(path, arch(shape, c["layer_norm_eps"], _GELU[c["hidden_act"]]), labels,
                      data, tensors)


def load_params(ckpt: Checkpoint, model_cfg, image_size: int, classes: tuple[str, ...]) -> dict:
    """Params (numpy) for vitpod's ViT from a checkpoint, ready for this dataset: its own
    head when its labels are `classes`, else a zero head; position embeddings resized."""
    mismatch = differences(ckpt.model, model_cfg)
    if mismatch:
        raise UserError(f"{ckpt.path}: the checkpoint has {', '.join(mismatch)}; set the "
                        "config to match")
    tensors = ckpt.tensors()
    _, abstract = model.abstract_model(model_cfg, image_size, len(classes))
    same_head = ckpt.labels == tuple(classes)
    names = _hf_names(model.parse_variant(model_cfg.variant).num_layers)
    params, missing = {}, []
    for path_keys, (name, how) in names.items():
        target = _at(abstract, path_keys)
        if path_keys[0] == "head" and not same_head:
            value = np.zeros(target.shape, np.float32)  # new classes: zero head
        elif name not in tensors:
            missing.append(name)
            continue
        else:
            value = _to_vitpod(tensors[name], how)
            if path_keys == ("pos_embed",) and value.shape != target.shape:
                value = resize_pos_embed(value, int(round(np.sqrt(target.shape[1] - 1))))
        if value.shape != target.shape:
            raise UserError(f"{ckpt.path}: tensor {name} has shape {value.shape}, vitpod "
                            f"expects {target.shape}")
        _put(params, path_keys, value.astype(np.float32))
    used = {n for n, _ in names.values()}
    unexpected = sorted(k for k in tensors if k not in used)
    if missing or unexpected:
        raise UserError(f"{ckpt.path}: missing tensors {missing or '-'}, unexpected tensors "
                        f"{unexpected[:10] or '-'}; is this a ViT checkpoint?")
    logging.info("imported %s (%s head)", ckpt.path, "its" if same_head else "a new zero")
    return params


def export(params: dict, model_cfg, data_cfg, classes: tuple[str, ...], out: str) -> None:
    """Write `out` as an HF ViTForImageClassification directory with the run's labels."""
    from transformers import ViTConfig, ViTImageProcessor

    if model_cfg.pool != "cls":
        raise UserError("model.pool='gap' has no Hugging Face ViT equivalent (it pools the "
                        "class token); only pool='cls' runs can be exported")
    shape = model.parse_variant(model_cfg.variant)
    os.makedirs(out, exist_ok=True)
    ViTConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
              num_attention_heads=shape.num_heads, intermediate_size=shape.mlp_dim,
              patch_size=shape.patch_size, image_size=data_cfg.image_size,
              layer_norm_eps=model_cfg.layer_norm_eps, qkv_bias=True,
              hidden_act={"exact": "gelu", "tanh": "gelu_pytorch_tanh"}[model_cfg.gelu],
              id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
              architectures=["ViTForImageClassification"]).save_pretrained(out)
    if model_cfg.posemb != "learn":  # HF learns them; the fixed values load as a start
        grid = data_cfg.image_size // shape.patch_size
        sincos = model.posemb_sincos_2d(grid, shape.hidden_size)
        params = {**params, "pos_embed": np.concatenate([np.zeros_like(sincos[:, :1]),
                                                         sincos], axis=1)}
    tensors = {}
    for path_keys, (name, how) in _hf_names(shape.num_layers).items():
        prefix = "" if path_keys[0] == "head" else "vit."
        tensors[prefix + name] = np.ascontiguousarray(_to_hf(np.asarray(_at(params, path_keys)),
                                                             how), np.float32)
    safetensors.numpy.save_file(tensors, os.path.join(out, WEIGHTS), metadata={"format": "pt"})
    # safetensors creates its file 0600; give it the mode of the files beside it
    shutil.copymode(os.path.join(out, "config.json"), os.path.join(out, WEIGHTS))
    size = data_cfg.image_size
    resample = {"bilinear": 2, "bicubic": 3}[data_cfg.eval_interpolation]  # PIL's numbers
    ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=resample,
                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                      image_mean=list(data_cfg.mean), image_std=list(data_cfg.std)
                      ).save_pretrained(out)


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _put(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value

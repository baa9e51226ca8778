"""Hugging Face ViT checkpoints in and out: `config.json` + `model.safetensors`.

Names map one to one onto vitpod's ViT (see `_hf_names`). Importing checks every shape,
reports missing and unexpected tensors in one message, gives a zero head when the classes
differ, and resizes position embeddings with the bicubic interpolation HF's
`interpolate_pos_encoding` uses. Exporting writes a directory that `transformers` loads,
with the run's class names and preprocessing.
"""

import json
import os

import numpy as np
import safetensors.numpy
from absl import logging

from vitpod import model, storage
from vitpod.errors import UserError

WEIGHTS, CONFIG = "model.safetensors", "config.json"


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
    if os.path.isdir(init_from) or storage.is_gcs(init_from):
        return init_from
    if init_from.count("/") != 1 or init_from.startswith((".", "/")):
        raise UserError(f"config model.init_from={init_from!r} is neither a directory nor a "
                        "Hugging Face hub id like 'google/vit-base-patch16-224'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(init_from, allow_patterns=[CONFIG, WEIGHTS])
    except Exception as e:  # noqa: BLE001  offline, unknown id, no access
        raise UserError(f"cannot download {init_from!r} from the Hugging Face hub "
                        f"({type(e).__name__}); without internet, download it elsewhere and "
                        "pass the directory holding config.json and model.safetensors as "
                        "model.init_from") from None


def variant_of(hf_cfg: dict, path: str) -> str:
    """The vitpod variant name ('B/16') with the checkpoint's shape."""
    shape = (hf_cfg.get("hidden_size"), hf_cfg.get("num_hidden_layers"),
             hf_cfg.get("num_attention_heads"), hf_cfg.get("intermediate_size"))
    for name, widths in model.WIDTHS.items():
        if widths == shape:
            return f"{name}/{hf_cfg.get('patch_size', 16)}"
    raise UserError(f"{path}: no vitpod variant has (hidden, layers, heads, mlp)={shape}; "
                    f"known: {model.WIDTHS}")


def _check_config(hf: dict, model_cfg, path: str) -> None:
    shape = model.parse_variant(model_cfg.variant)
    theirs = (hf.get("hidden_size"), hf.get("num_hidden_layers"), hf.get("num_attention_heads"),
              hf.get("intermediate_size"), hf.get("patch_size"))
    ours = (shape.hidden_size, shape.num_layers, shape.num_heads, shape.mlp_dim, shape.patch_size)
    if theirs != ours:
        raise UserError(f"{path}: checkpoint is (hidden, layers, heads, mlp, patch)={theirs} but "
                        f"model.variant={model_cfg.variant!r} is {ours}; set the matching variant")
    problems = []
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (vitpod has 'gelu')")
    if not hf.get("qkv_bias", True):
        problems.append("qkv_bias=false (vitpod has biases)")
    if abs(hf.get("layer_norm_eps", 1e-12) - model_cfg.layer_norm_eps) > 1e-15:
        problems.append(f"layer_norm_eps={hf.get('layer_norm_eps', 1e-12)} but "
                        f"model.layer_norm_eps={model_cfg.layer_norm_eps}; set it to match")
    if model_cfg.pool != "cls":
        problems.append("HF ViT pools the class token; set model.pool='cls'")
    if model_cfg.posemb != "learn":
        problems.append("HF ViT has learned position embeddings; set model.posemb='learn'")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))


def load_params(init_from: str, model_cfg, image_size: int, classes: tuple[str, ...]) -> dict:
    """Params (numpy) for vitpod's ViT from an HF checkpoint, ready for this dataset."""
    path = resolve(init_from)
    hf_cfg = json.loads(storage.read_text(storage.join(path, CONFIG)))
    _check_config(hf_cfg, model_cfg, path)
    tensors = safetensors.numpy.load(storage.read_bytes(storage.join(path, WEIGHTS)))
    tensors = {k.removeprefix("vit."): v for k, v in tensors.items()}
    _, abstract = model.abstract_model(model_cfg, image_size, len(classes))
    id2label = hf_cfg.get("id2label") or {}
    same_head = [id2label.get(str(i)) for i in range(len(id2label))] == list(classes)
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
            raise UserError(f"{path}: tensor {name} has shape {value.shape}, vitpod expects "
                            f"{target.shape}")
        _put(params, path_keys, value.astype(np.float32))
    used = {n for n, _ in names.values()}
    unexpected = sorted(k for k in tensors if k not in used and not k.startswith("pooler."))
    if missing or unexpected:
        raise UserError(f"{path}: missing tensors {missing or '-'}, unexpected tensors "
                        f"{unexpected[:10] or '-'}; is this a ViT checkpoint?")
    logging.info("imported %s (%s head)", path, "its" if same_head else "a new zero")
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
              layer_norm_eps=model_cfg.layer_norm_eps, qkv_bias=True, hidden_act="gelu",
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
    size = data_cfg.image_size
    ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=2,
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

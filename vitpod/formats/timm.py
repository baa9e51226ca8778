"""timm `save_for_hf` directories of the plain ViT family, read as HF ViT tensors.

`config.json` holds `architecture` ("vit_base_patch16_224"), `num_classes`, `global_pool`,
optional `label_names` and `model_args` (dims overriding the architecture's), and
`pretrained_cfg`, whose eval preprocessing (input size, crop_pct, interpolation, mean, std)
becomes the checkpoint's data keys. Weights are `model.safetensors`, or `pytorch_model.bin`
(timm's default), which only torch reads. Only what maps onto vitpod's ViT is accepted:
class-token pooling, pre-norm blocks with biased fused qkv, learned position embeddings
covering the class token, no registers, layer scale or distillation token.
"""

import io
import re

import numpy as np
import safetensors.numpy

from vitpod import model, storage
from vitpod.errors import UserError
from vitpod.formats import common

_BIN = "pytorch_model.bin"
# timm's size words -> heads, for configs without model_args.num_heads (timm's defaults).
_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16,
          "giant": 16, "gigantic": 16}
_GELU = {"gelu": "exact", "gelu_tanh": "tanh"}
# timm model_args that change the architecture away from vitpod's: value that is refused.
_REFUSED_ARGS = {"class_token": (False, "no class token"),
                 "no_embed_class": (True, "position embeddings without the class token's"),
                 "pre_norm": (True, "a norm before the blocks (pre_norm)"),
                 "fc_norm": (True, "a norm after pooling (fc_norm)"),
                 "qk_norm": (True, "normed queries and keys (qk_norm)"),
                 "qkv_bias": (False, "no qkv bias"),
                 "final_norm": (False, "no final norm")}
_NAMES = [(r"patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
          (r"cls_token", "embeddings.cls_token"),
          (r"pos_embed", "embeddings.position_embeddings"),
          (r"blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
          (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
          (r"blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
          (r"blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
          (r"blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
          (r"norm\.", "layernorm."),
          (r"head\.", "classifier.")]


def read(path: str, config: dict) -> common.Checkpoint:
    """The timm ViT in directory `path` (its config.json parsed); UserError naming what
    is unsupported."""
    args = config.get("model_args") or {}
    arch = config["architecture"]
    where = storage.join(path, common.CONFIG)
    _refuse_unsupported(config, args, where)
    pre = config.get("pretrained_cfg") or {}
    _, height, width = pre.get("input_size", (3, 224, 224))
    if height != width or pre.get("crop_mode", "center") != "center" or \
            pre.get("interpolation", "bicubic") not in ("bilinear", "bicubic"):
        raise UserError(f"{where}: unsupported eval preprocessing "
                        f"input_size={pre.get('input_size')}, crop_mode={pre.get('crop_mode')!r},"
                        f" interpolation={pre.get('interpolation')!r} (vitpod: square input, "
                        "'center' crop, 'bilinear' or 'bicubic')")
    data = {"image_size": height, "eval_crop_pct": pre.get("crop_pct", 0.9),
            "eval_interpolation": pre.get("interpolation", "bicubic"),
            "mean": tuple(pre.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(pre.get("std", (0.229, 0.224, 0.225)))}
    tensors = _tensors(path)
    size = re.match(r"[a-z0-9]+_([a-z]+)_", arch)
    heads = args.get("num_heads") or _HEADS.get(size.group(1) if size else "")
    if not heads:
        raise UserError(f"{where}: architecture {arch!r} does not say "
                        "its heads; add model_args.num_heads")
    kernel = tensors["embeddings.patch_embeddings.projection.weight"]  # (D, 3, p, p)
    depth = sum(k.endswith("layernorm_before.weight") for k in tensors)
    shape = model.ViTShape(kernel.shape[0], depth, heads,
                           tensors["encoder.layer.0.intermediate.dense.weight"].shape[0],
                           kernel.shape[-1])
    num_classes = config.get("num_classes", 1000)
    labels = tuple(config.get("label_names") or (str(i) for i in range(num_classes)))
    if "classifier.weight" not in tensors:
        labels = ()
    gelu = _GELU[args.get("act_layer") or "gelu"]
    return common.Checkpoint(path, common.arch(shape, 1e-6, gelu), labels, data,
                             lambda: tensors)


def _refuse_unsupported(config: dict, args: dict, where: str) -> None:
    unsupported = []
    arch = config["architecture"]
    if not arch.startswith(("vit_", "deit_")) or "distilled" in arch:
        unsupported.append(f"architecture {arch!r} (vitpod reads plain vit_* models; DeiT's "
                           "distillation token is not)")
    pool = config.get("global_pool", args.get("global_pool", "token"))
    if pool != "token":
        unsupported.append(f"global_pool={pool!r} (vitpod pools the class token)")
    if args.get("reg_tokens"):
        unsupported.append(f"{args['reg_tokens']} register tokens (reg_tokens)")
    if args.get("init_values"):
        unsupported.append(f"layer scale (init_values={args['init_values']})")
    for key, (refused, what) in _REFUSED_ARGS.items():
        if key in args and args[key] == refused:
            unsupported.append(f"{what} ({key}={args[key]})")
    if (args.get("act_layer") or "gelu") not in _GELU:
        unsupported.append(f"act_layer={args['act_layer']!r} (vitpod has {', '.join(_GELU)})")
    for key in ("embed_layer", "block_fn", "mlp_layer", "norm_layer", "pos_embed"):
        if args.get(key) not in (None, "learn", "layernorm"):
            unsupported.append(f"{key}={args[key]!r}")
    if unsupported:
        raise UserError(f"{where}: unsupported timm model: {'; '.join(unsupported)}")


def _tensors(path: str) -> dict:
    """The weights under HF ViT names, qkv split into query, key and value."""
    safetensors_path = storage.join(path, common.WEIGHTS)
    if storage.exists(safetensors_path):
        raw = safetensors.numpy.load(storage.read_bytes(safetensors_path))
    else:
        raw = _read_bin(storage.join(path, _BIN))
    known = {"reg_token": "register tokens", "dist_token": "a distillation token",
             ".ls1.": "layer scale", "fc_norm.": "a norm after pooling (fc_norm)",
             "attn_pool.": "attention pooling (MAP)", "norm_pre.": "a norm before the blocks",
             ".q_norm.": "normed queries (qk_norm)"}
    found = sorted({what for k in raw for key, what in known.items() if key in k})
    if "cls_token" not in raw:
        found.append("no class token")
    if found:
        raise UserError(f"{path}: unsupported timm model: {'; '.join(found)}")
    out, unexpected = {}, []
    for name, value in raw.items():
        qkv = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if qkv:
            for part, piece in zip(("query", "key", "value"), np.split(value, 3), strict=True):
                out[f"encoder.layer.{qkv[1]}.attention.attention.{part}.{qkv[2]}"] = piece
            continue
        for pattern, hf_name in _NAMES:
            if re.match(pattern, name):
                out[re.sub(pattern, hf_name, name, count=1)] = value
                break
        else:
            unexpected.append(name)
    if unexpected:
        raise UserError(f"{path}: unexpected timm tensors {sorted(unexpected)[:10]}; vitpod "
                        "reads plain class-token ViTs")
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _read_bin(bin_path: str) -> dict:
    if not storage.exists(bin_path):
        raise UserError(f"{bin_path}: missing, and no {common.WEIGHTS} beside it either")
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{bin_path} needs torch to read; convert it once where torch is installed: "
            "python -c \"import torch, safetensors.torch as s; s.save_file(torch.load("
            "'pytorch_model.bin', map_location='cpu'), 'model.safetensors')\"") from None
    state = torch.load(io.BytesIO(storage.read_bytes(bin_path)), map_location="cpu",
                       weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}

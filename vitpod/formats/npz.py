"""big_vision and vision_transformer (AugReg) `.npz` checkpoints, read as HF ViT tensors.

Two layouts of flax's names, both with flax's tanh GELU and LayerNorm epsilon 1e-6:
- vision_transformer: `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}`, `Transformer/posembed_input/pos_embedding` covering the class
  token, optionally a `pre_logits` layer (tanh) under the head, keys maybe under `opt/target/`;
- big_vision: keys under `params/`, `{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}`, `pos_embedding` added before the class token joins (so it
  has none), blocks maybe one scanned `Transformer/encoderblock` with a leading layer axis.
Flax keeps attention kernels per head, (D, heads, head_dim) and (heads, head_dim, D):
their shapes give the head count. Images are normalised to [-1, 1] in both repos.
"""

import io
import math

import numpy as np
from absl import logging

from vitpod import model, storage
from vitpod.errors import UserError
from vitpod.formats import common

_PREFIXES = ("params/img/", "params/", "opt/target/")
_POS = ("pos_embedding", "Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding")


def read(path: str) -> common.Checkpoint:
    """The class-token ViT in the .npz at `path`; refuses other poolings in one line."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(path))) as npz:
            w = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in w), "")
    w = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    _refuse_unsupported(w, path)
    try:
        tensors, depth, heads = _blocks(w)
        tensors.update(_embeddings(w, path))
        tensors["layernorm.weight"] = w.pop("Transformer/encoder_norm/scale")
        tensors["layernorm.bias"] = w.pop("Transformer/encoder_norm/bias")
    except KeyError as e:
        raise UserError(f"{path}: array {prefix + e.args[0]!r} missing; is this a ViT "
                        "checkpoint?") from None
    pre_logits = [w.pop(k) for k in ("pre_logits/kernel", "pre_logits/bias") if k in w]
    head = [w.pop(k) for k in ("head/kernel", "head/bias") if k in w]
    if pre_logits:  # as HF and timm do: a new head sits on the encoder itself
        logging.warning("%s: a tanh pre_logits layer, which vitpod's ViT has not, sits under "
                        "its head; both are dropped (fine-tune it with a new head)", path)
    labels = ()
    if len(head) == 2 and not pre_logits:
        tensors["classifier.weight"], tensors["classifier.bias"] = head[0].T, head[1]
        labels = tuple(str(i) for i in range(head[1].shape[-1]))
    if w:
        raise UserError(f"{path}: unexpected arrays {[prefix + k for k in sorted(w)[:10]]}; "
                        "vitpod reads plain class-token ViTs")
    kernel = tensors["embeddings.patch_embeddings.projection.weight"]  # (D, 3, p, p)
    shape = model.ViTShape(kernel.shape[0], depth, heads,
                           tensors["encoder.layer.0.intermediate.dense.weight"].shape[0],
                           kernel.shape[-1])
    grid = math.isqrt(tensors["embeddings.position_embeddings"].shape[1] - 1)
    data = {"image_size": grid * shape.patch_size, "mean": (0.5,) * 3, "std": (0.5,) * 3,
            "eval_crop_pct": 1.0}
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    return common.Checkpoint(path, common.arch(shape, 1e-6, "tanh"), labels, data,
                             lambda: tensors)


def _refuse_unsupported(w: dict, path: str) -> None:
    unsupported = []
    if any(k.startswith("MAPHead_") for k in w):
        unsupported.append("a MAP head (MAPHead_0)")
    if "cls" not in w:
        unsupported.append("no class token 'cls' (GAP or MAP pooling)")
    if not any(k in w for k in _POS):
        unsupported.append("position embeddings not stored (sincos2d)")
    if "embedding/kernel" not in w:
        unsupported.append("no patch embedding 'embedding/kernel' (not a ViT?)")
    if unsupported:
        raise UserError(f"{path}: unsupported checkpoint: {'; '.join(unsupported)}; vitpod "
                        "imports class-token ViTs with learned position embeddings")


def _blocks(w: dict) -> tuple[dict, int, int]:
    """(HF tensors of all blocks, depth, heads), their arrays popped from `w`."""
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    depth = (w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if scanned else
             sum(f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w for i in range(len(w))))
    first = "Transformer/encoderblock" + ("/" if scanned else "_0/")
    # vision_transformer numbers the block's modules in order; big_vision per module type.
    numbers = (0, 1, 2, 3) if f"{first}MultiHeadDotProductAttention_1/query/kernel" in w \
        else (0, 0, 1, 0)
    kinds = ("LayerNorm", "MultiHeadDotProductAttention", "LayerNorm", "MlpBlock")
    modules = [f"{kind}_{n}" for kind, n in zip(kinds, numbers, strict=True)]
    query = f"{first}{modules[1]}/query/kernel"
    if not depth or query not in w:
        raise KeyError(query if depth else f"{first}LayerNorm_0/scale")
    heads = w[query].shape[-2]  # (D, heads, head_dim), after the layer axis if scanned
    tensors = {}
    for i in range(depth):
        base = "Transformer/encoderblock" + ("/" if scanned else f"_{i}/")

        def get(name, base=base, i=i):
            if base + name not in w:
                raise KeyError(base + name)
            return w[base + name][i] if scanned else w.pop(base + name)

        tensors.update(_block(get, i, *modules))
    for k in [k for k in w if k.startswith("Transformer/encoderblock/")] if scanned else []:
        del w[k]
    return tensors, depth, heads


def _embeddings(w: dict, path: str) -> dict:
    kernel = w.pop("embedding/kernel")  # (p, p, 3, D)
    cls = w.pop("cls")
    pos = w.pop(next(k for k in _POS if k in w))
    n = pos.shape[1]
    if n > 1 and math.isqrt(n - 1) ** 2 == n - 1:
        pass  # covers the class token too (HF's layout)
    elif math.isqrt(n) ** 2 == n:  # added before the class token joins: it gets none
        pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    else:
        raise UserError(f"{path}: position embeddings for {n} tokens are not a square grid")
    return {"embeddings.patch_embeddings.projection.weight": kernel.transpose(3, 2, 0, 1),
            "embeddings.patch_embeddings.projection.bias": w.pop("embedding/bias"),
            "embeddings.cls_token": cls.reshape(1, 1, -1),
            "embeddings.position_embeddings": pos}


def _block(get, i: int, norm1: str, attn: str, norm2: str, mlp: str) -> dict:
    """Block i's HF tensors; `get(name)` gives its flax array named `module/param`."""
    hf_block = f"encoder.layer.{i}"
    out = {f"{hf_block}.layernorm_before.weight": get(f"{norm1}/scale"),
           f"{hf_block}.layernorm_before.bias": get(f"{norm1}/bias"),
           f"{hf_block}.layernorm_after.weight": get(f"{norm2}/scale"),
           f"{hf_block}.layernorm_after.bias": get(f"{norm2}/bias")}
    for name in ("query", "key", "value"):
        kernel = get(f"{attn}/{name}/kernel")  # (D, heads, head_dim)
        out[f"{hf_block}.attention.attention.{name}.weight"] = \
            kernel.reshape(kernel.shape[0], -1).T
        out[f"{hf_block}.attention.attention.{name}.bias"] = get(f"{attn}/{name}/bias").ravel()
    kernel = get(f"{attn}/out/kernel")  # (heads, head_dim, D)
    out[f"{hf_block}.attention.output.dense.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
    out[f"{hf_block}.attention.output.dense.bias"] = get(f"{attn}/out/bias")
    for name, dense in (("intermediate.dense", "Dense_0"), ("output.dense", "Dense_1")):
        out[f"{hf_block}.{name}.weight"] = get(f"{mlp}/{dense}/kernel").T
        out[f"{hf_block}.{name}.bias"] = get(f"{mlp}/{dense}/bias")
    return out

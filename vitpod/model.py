"""Vision Transformer in Flax NNX, with a variants table and a functional wrapper.

Layout follows "An Image is Worth 16x16 Words" and HF's ViT (pre-norm blocks, conv patch
embedding, class token or global average pooling, learned or fixed 2D sincos position
embeddings), so that HF checkpoints map onto it name by name.

`model.variant` is a name from `WIDTHS` with the patch size ("B/16", "So400m/14"), or any
shape spelled "wWIDTH-dDEPTH-hHEADS-mMLP/PATCH" ("w48-d3-h4-m96/8": width 48, 3 blocks,
4 heads, MLP size 96, 8 px patches). `variant_name` writes a shape back, by name when the
table has it. `model.gelu` is "exact" (erf, HF's "gelu") or "tanh" (the approximation of
flax's `nn.gelu`, which the original ViT and big_vision use; HF's "gelu_pytorch_tanh").

Dropout and stochastic depth draw their randomness from one key per example (`row_keys`),
so a batch split over any number of devices or microbatches drops the same units; without
`row_keys` (eval, inference) both are the identity.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vitpod.attention import Attention
from vitpod.errors import UserError

# name: (hidden_size, num_layers, num_heads, mlp_dim). Patch size comes from "NAME/PATCH".
# Ti..H and So400m..e as big_vision's vit.py (So400m: Alabdulmohsin et al. 2023; g, G:
# Zhai et al. 2022; e: Chen et al. 2023). The published So400m checkpoints pool with a MAP
# head, which vitpod does not import: these names are for training from scratch.
WIDTHS = {
    "pico": (32, 2, 2, 64),  # tests
    "mu": (64, 4, 4, 128),  # demo
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "So400m": (1152, 27, 16, 4304),
    "g": (1408, 40, 16, 6144),
    "G": (1664, 48, 16, 8192),
    "e": (1792, 56, 16, 15360),
}
_FREE_FORM = re.compile(r"w(\d+)-d(\d+)-h(\d+)-m(\d+)")


@dataclasses.dataclass(frozen=True)
class ViTShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int


def parse_variant(variant: str) -> ViTShape:
    """'S/16' or 'w48-d3-h4-m96/8' -> its shape; raises UserError for anything else."""
    name, _, patch = variant.partition("/")
    free = _FREE_FORM.fullmatch(name)
    widths = WIDTHS.get(name) or (free and tuple(int(g) for g in free.groups()))
    if not widths or not patch.isdigit() or not all(widths) or not int(patch):
        raise UserError(f"config model.variant={variant!r} is unknown; use NAME/PATCH with "
                        f"NAME one of {', '.join(WIDTHS)} (e.g. 'S/16'), or any shape as "
                        "wWIDTH-dDEPTH-hHEADS-mMLP/PATCH (e.g. 'w48-d3-h4-m96/8')")
    if widths[0] % widths[2]:
        raise UserError(f"config model.variant={variant!r}: width {widths[0]} is not a "
                        f"multiple of the {widths[2]} heads")
    return ViTShape(*widths, patch_size=int(patch))


def variant_name(shape: ViTShape) -> str:
    """The `model.variant` for a shape: its table name when it has one ('B/16')."""
    widths = (shape.hidden_size, shape.num_layers, shape.num_heads, shape.mlp_dim)
    name = next((n for n, w in WIDTHS.items() if w == widths), None)
    return f"{name or 'w{}-d{}-h{}-m{}'.format(*widths)}/{shape.patch_size}"


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed (1, grid*grid, width) embedding of "Better plain ViT baselines" (big_vision):
    sin/cos of x and of y at width/4 frequencies each."""
    if width % 4:
        raise UserError(f"model.posemb='sincos2d' needs a hidden size divisible by 4, not {width}")
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.outer(y.ravel(), omega), np.outer(x.ravel(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], 1)[None].astype(
        np.float32)


def _dropped(x, rate, row_keys, site, per_example: bool = False, on: bool = True):
    """Inverted dropout of x (batch, ...) with each row's mask from its own key; with
    `per_example` one draw per row (stochastic depth: the whole residual branch). `rate`
    and `site` may be traced (inside the scan over layers); `on` is the static switch."""
    if row_keys is None or not on:
        return x
    shape = (1,) * (x.ndim - 1) if per_example else x.shape[1:]
    keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), 1 - rate,
                                                   shape))(row_keys)
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, dim: int, mlp_dim: int, gelu: str, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
        self.tanh_gelu = gelu == "tanh"

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.tanh_gelu))


class Block(nnx.Module):
    def __init__(self, shape: ViTShape, cfg, drop_path: float, index: int, dtype,
                 rngs: nnx.Rngs):
        d, eps = shape.hidden_size, cfg.layer_norm_eps
        self.dropout, self.drop_path, self.index = cfg.dropout, drop_path, index
        self.drop_path_on = cfg.drop_path > 0
        self.norm1 = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(d, shape.num_heads, dtype, rngs, cfg.attention == "auto")
        self.norm2 = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(d, shape.mlp_dim, cfg.gelu, dtype, rngs)

    def __call__(self, x_bld, row_keys=None, index=None, drop_path=None):
        """`index` and `drop_path` override this block's own (the scan passes them)."""
        index = self.index if index is None else index
        drop_path = self.drop_path if drop_path is None else drop_path
        site = 8 * (index + 1)  # distinct random streams per layer and per use
        on = self.dropout > 0
        branch = _dropped(self.attn(self.norm1(x_bld)), self.dropout, row_keys, site, on=on)
        x_bld = x_bld + _dropped(branch, drop_path, row_keys, site + 1, True, self.drop_path_on)
        branch = _dropped(self.mlp(self.norm2(x_bld)), self.dropout, row_keys, site + 2, on=on)
        return x_bld + _dropped(branch, drop_path, row_keys, site + 3, True, self.drop_path_on)


class ViT(nnx.Module):
    """Images (batch, height, width, 3), normalised floats -> class logits (float32)."""

    def __init__(self, cfg: ml_collections.ConfigDict, image_size: int, num_classes: int,
                 rngs: nnx.Rngs):
        shape = parse_variant(cfg.variant)
        if image_size % shape.patch_size:
            raise UserError(f"config data.image_size={image_size} is not a multiple of the "
                            f"patch size {shape.patch_size} of model.variant={cfg.variant}")
        d, p = shape.hidden_size, shape.patch_size
        dtype = jnp.dtype(cfg.dtype)
        num_patches = (image_size // p) ** 2
        self.pool, self.dropout = cfg.pool, cfg.dropout
        self.scan_layers, self.remat = cfg.scan_layers, cfg.remat
        self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                                    rngs=rngs)
        init = nnx.initializers.normal(0.02)
        tokens = num_patches + (1 if cfg.pool == "cls" else 0)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d))) if cfg.pool == "cls" else None
        if cfg.posemb == "learn":
            self.pos_embed = nnx.Param(init(rngs.params(), (1, tokens, d)))
        else:  # fixed: a constant of the program, not a param (the class token gets none)
            self.pos_embed, self.grid = None, image_size // p
        # Stochastic depth rising linearly to model.drop_path at the last block (DeiT, timm).
        self.drop_path_rates = tuple(np.linspace(0.0, cfg.drop_path, shape.num_layers).tolist())
        self.blocks = nnx.List([Block(shape, cfg, self.drop_path_rates[i], i, dtype, rngs)
                                for i in range(shape.num_layers)])
        self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        # Zero head: every class starts equally likely (big_vision; stable fine-tuning).
        self.head = nnx.Linear(d, num_classes, kernel_init=nnx.initializers.zeros_init(),
                               dtype=dtype, rngs=rngs)

    def __call__(self, images_bhwc, row_keys=None):
        x_bld = self.embed(images_bhwc, row_keys)
        for block in self.blocks:
            x_bld = block(x_bld, row_keys)
        return self.logits(x_bld)

    def embed(self, images_bhwc, row_keys=None):
        x_bhwd = self.patch_embed(images_bhwc)
        b, h, w, d = x_bhwd.shape
        x_bld = x_bhwd.reshape(b, h * w, d)
        if self.pos_embed is None:
            x_bld = x_bld + jnp.asarray(posemb_sincos_2d(self.grid, d), x_bld.dtype)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x_bld.dtype), (b, 1, d))
            x_bld = jnp.concatenate([cls, x_bld], axis=1)
        if self.pos_embed is not None:
            x_bld = x_bld + self.pos_embed[...].astype(x_bld.dtype)
        return _dropped(x_bld, self.dropout, row_keys, 0, on=self.dropout > 0)

    def logits(self, x_bld):
        x_bld = self.norm(x_bld)
        x_bd = x_bld[:, 0] if self.pool == "cls" else x_bld.mean(axis=1)
        return self.head(x_bd).astype(jnp.float32)


def abstract_model(cfg, image_size: int, num_classes: int):
    """(graphdef, abstract params) without allocating anything."""
    model = nnx.eval_shape(lambda: ViT(cfg, image_size, num_classes, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def init_params(cfg, image_size: int, num_classes: int, rng: jax.Array) -> dict:
    """Fresh params as a plain nested dict of arrays (call under jit to place them)."""
    model = ViT(cfg, image_size, num_classes, nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.split(model)[1])


# What the backward pass of each block may keep from its forward pass ("none": no remat,
# everything, FSDP's gathered weights included). "dots" and "full" gather again instead.
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's input
}


def apply(graphdef, params: dict, images_bhwc: jax.Array, row_keys=None,
          gather=None) -> jax.Array:
    """Pure forward pass: params dict + images -> logits.

    `row_keys` (one PRNG key per image) turn on dropout and stochastic depth for training.
    `gather(tree, block: bool)` turns this device's param shards into whole params (FSDP):
    the non-block params once, each block's inside the loop over layers. With
    `model.scan_layers` the blocks run as one `lax.scan` over their params stacked here
    (the stored layout stays one dict per block); unset, they scan only where that saves
    memory: with FSDP (`gather`) or remat. Each block runs under `model.remat`'s policy.
    """
    sharded, gather = gather is not None, gather or (lambda tree, block: tree)
    outer = gather({k: v for k, v in params.items() if k != "blocks"}, False)
    blocks = params["blocks"]
    model = nnx.merge(graphdef, {**outer, "blocks": blocks})
    scan = model.scan_layers
    if scan is None:
        scan = sharded or model.remat != "none"
    block_def = nnx.split(model.blocks[0])[0]

    def layer(x_bld, inputs):
        block_params, index, drop_path = inputs
        block = nnx.merge(block_def, gather(block_params, True))
        return block(x_bld, row_keys, index, drop_path), None

    if model.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[model.remat], prevent_cse=False)
    x_bld = model.embed(images_bhwc, row_keys)
    if not scan:  # unrolled: XLA keeps each layer's activations as they are
        for i, rate in enumerate(model.drop_path_rates):
            x_bld, _ = layer(x_bld, (blocks[i], i, rate))
        return model.logits(x_bld)
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *[blocks[i] for i in
                                                                 range(len(blocks))])
    rates = jnp.asarray(model.drop_path_rates, jnp.float32)
    x_bld, _ = jax.lax.scan(layer, x_bld, (stacked, jnp.arange(len(blocks)), rates))
    return model.logits(x_bld)

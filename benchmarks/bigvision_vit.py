# Copyright 2024 Big Vision Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""big_vision's ViT, the reference step's model (benchmarks/tpu_step.py).

Copied from google-research/big_vision, big_vision/models/vit.py at commit
0127fb6b337ee2a27bf4e54dea79cff176527356, keeping only what the reference configuration runs
(learned or sincos posemb, unrolled blocks, "gap"/"tok" pooling, a head). Changes: 4-space
indentation; the scan/remat branch, MAP head, rep_size, the per-patch logits and the
checkpoint helpers removed; `decode_variant` keeps the variants vitpod benchmarks. The math
of what remains is unchanged.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def posemb_sincos_2d(h, w, width, temperature=10_000., dtype=jnp.float32):
    """Follows the MoCo v3 logic."""
    y, x = jnp.mgrid[:h, :w]
    assert width % 4 == 0, "Width must be mult of 4 for sincos posemb"
    omega = jnp.arange(width // 4) / (width // 4 - 1)
    omega = 1. / (temperature**omega)
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return jnp.asarray(pe, dtype)[None, :, :]


def get_posemb(self, typ, seqshape, width, name, dtype=jnp.float32):
    if typ == "learn":
        return self.param(name, nn.initializers.normal(stddev=1 / np.sqrt(width)),
                          (1, np.prod(seqshape), width), dtype)
    elif typ == "sincos2d":
        return posemb_sincos_2d(*seqshape, width, dtype=dtype)
    raise ValueError(f"Unknown posemb type: {typ}")


class MlpBlock(nn.Module):
    """Transformer MLP / feed-forward block."""
    mlp_dim: int | None = None  # Defaults to 4x input dim
    dropout: float = 0.0
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x, deterministic=True):
        inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(stddev=1e-6))
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype_mm, **inits)(x)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
        x = nn.gelu(x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(d, dtype=self.dtype_mm, **inits)(x)


class Encoder1DBlock(nn.Module):
    """Single transformer encoder block (MHSA + MLP)."""
    mlp_dim: int | None = None  # Defaults to 4x input dim
    num_heads: int = 12
    dropout: float = 0.0
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x, deterministic=True):
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
            deterministic=deterministic, dtype=self.dtype_mm)(y, y)
        y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_emb"))
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = x + y
        y = nn.LayerNorm()(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                     dtype_mm=self.dtype_mm)(y, deterministic)
        y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_emb"))
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = x + y
        return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))


class Encoder(nn.Module):
    """Transformer Model Encoder for sequence to sequence translation (unrolled)."""
    depth: int
    mlp_dim: int | None = None  # Defaults to 4x input dim
    num_heads: int = 12
    dropout: float = 0.0
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x, deterministic=True):
        for lyr in range(self.depth):
            x = Encoder1DBlock(name=f"encoderblock_{lyr}", dtype_mm=self.dtype_mm,
                               mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                               dropout=self.dropout)(x, deterministic)
        return nn.LayerNorm(name="encoder_norm")(x)


class _Model(nn.Module):
    """ViT model."""
    num_classes: int | None = None
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None  # Defaults to 4x input dim
    num_heads: int = 12
    posemb: str = "learn"  # Can also be "sincos2d"
    dropout: float = 0.0
    pool_type: str = "gap"  # Can also be "tok"
    head_zeroinit: bool = True
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, image, *, train=False):
        image = jnp.asarray(image, self.dtype_mm)
        x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                    name="embedding", dtype=self.dtype_mm)(image)
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])
        # Add posemb before adding extra token.
        x = x + get_posemb(self, self.posemb, (h, w), c, "pos_embedding", x.dtype)
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    dropout=self.dropout, dtype_mm=self.dtype_mm, name="Transformer")(
                        x, deterministic=not train)
        if self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        elif self.pool_type == "tok":
            x = x[:, 0]
        else:
            raise ValueError(f"Unknown pool type: '{self.pool_type}'")
        kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
        return nn.Dense(self.num_classes, name="head", **kw)(x), {}


def Model(num_classes=None, *, variant=None, **kw):  # noqa: N802
    """Factory function, because linen really don't like what I'm doing!"""
    return _Model(num_classes, **{**decode_variant(variant), **kw})


def decode_variant(variant):
    """Converts a string like "B" or "B/32" into a params dict."""
    if variant is None:
        return {}
    v, patch = variant, {}
    if "/" in variant:
        v, patch = variant.split("/")
        patch = {"patch_size": (int(patch), int(patch))}
    # Reference: Table 2 of https://arxiv.org/abs/2106.04560.
    return {"width": {"mu": 32, "Ti": 192, "S": 384, "B": 768, "L": 1024}[v],
            "depth": {"mu": 1, "Ti": 12, "S": 12, "B": 12, "L": 24}[v],
            "mlp_dim": {"mu": 128, "Ti": 768, "S": 1536, "B": 3072, "L": 4096}[v],
            "num_heads": {"mu": 2, "Ti": 3, "S": 6, "B": 12, "L": 16}[v],
            **patch}

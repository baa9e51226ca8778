"""Soft targets for the train step: label smoothing, Mixup and CutMix of a device's rows.

One ratio (and one CutMix box) per step, drawn from the step's key, and each row mixed
with its neighbour (rows 2i and 2i+1 swap partners). The pairs never cross a device or a
microbatch boundary as long as those hold an even number of rows (config validation checks
it), so every mesh layout and accumulation setting mixes the same images the same way.
"""

import jax
import jax.numpy as jnp
import ml_collections


def smoothed(labels, num_classes: int, smoothing: float):
    """One-hot targets with `smoothing` of the mass spread evenly over all classes."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def partner(x):
    """Each row's mixing partner: rows 2i and 2i+1 swapped."""
    return x.reshape(-1, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)


def enabled(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def cutmix_box(key, height: int, width: int, lam):
    """timm's rand_bbox: a box of area about (1 - lam) centred uniformly, clipped to the
    image; returns its (height, width) mask and the exact kept fraction."""
    ky, kx = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return inside, 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)


def mix(key, images_bhwc, targets_bk, cfg: ml_collections.ConfigDict):
    """(images, targets) mixed with each row's partner; targets still sum to 1 per row."""
    k_which, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_which, cfg.cutmix_prob)
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
    lam_mixup = (jax.random.beta(k_mixup, cfg.mixup_alpha, cfg.mixup_alpha)
                 if cfg.mixup_alpha > 0 else jnp.float32(1.0))
    lam_cut = (jax.random.beta(k_cutmix, cfg.cutmix_alpha, cfg.cutmix_alpha)
               if cfg.cutmix_alpha > 0 else jnp.float32(1.0))
    inside, lam_box = cutmix_box(k_box, images_bhwc.shape[1], images_bhwc.shape[2], lam_cut)
    other = partner(images_bhwc)
    blended = lam_mixup * images_bhwc + (1.0 - lam_mixup) * other
    pasted = jnp.where(inside[None, :, :, None], other, images_bhwc)
    images = jnp.where(use_cutmix, pasted, blended).astype(images_bhwc.dtype)
    lam = jnp.where(use_cutmix, lam_box, lam_mixup)
    return images, lam * targets_bk + (1.0 - lam) * partner(targets_bk)

"""The optax optimizer: warmup + cosine decay, AdamW with decay on kernels only, clipping."""

import jax
import ml_collections
import optax


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params) -> dict:
    """True for weight matrices and conv kernels; biases, norms, embeddings, cls are not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw

"""The optax optimizer: warmup then cosine, linear or constant-with-cooldown; AdamW with
decay on kernels only; layer-wise lr decay; frozen params. Every transform is elementwise,
so it runs on FSDP shards as on whole params.

Weight decay is optax's: `p -= lr_t * weight_decay * p`, so it follows the lr schedule and
scales with the peak lr. big_vision's decoupled `wd` is `p -= sched_t * wd * p` (the
schedule's multiplier, not the lr), so big_vision `wd` = `optim.weight_decay * optim.lr`:
its ViT-S/16 recipe (lr 1e-3, wd 1e-4) is `optim.weight_decay=0.1` here.
"""

import re

import jax
import ml_collections
import optax

from vitpod.errors import UserError


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
            decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=end)
    after = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, after)
    else:  # constant, then a linear cooldown over the last cooldown_steps
        decay = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end,
                                                                   cfg.cooldown_steps)],
            [after - cfg.cooldown_steps])
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def param_names(params) -> dict:
    """The params tree with each leaf replaced by its dotted name ('blocks.3.mlp.fc1.kernel')."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
        params)


def decay_mask(params) -> dict:
    """True for weight matrices and conv kernels; biases, norms, embeddings, cls are not decayed."""
    return jax.tree.map(lambda name: name.endswith(".kernel"), param_names(params))


def layer_multipliers(params, layer_decay: float) -> dict:
    """LLRD (BEiT, timm): block i of L gets layer_decay**(L - i); patch/position embeddings
    and the class token (layer 0) layer_decay**(L + 1); the final norm and head 1."""
    names = param_names(params)
    layers = 1 + max((int(n.split(".")[1]) for n in jax.tree.leaves(names)
                      if n.startswith("blocks.")), default=-1)

    def depth(name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return layers + 1 if name.startswith(("norm.", "head.")) else 0
    return jax.tree.map(lambda n: layer_decay ** (layers + 1 - depth(n)), names)


def frozen_labels(pattern: str, params) -> dict:
    """'frozen' for params whose name matches `pattern` (re.search), else 'train'."""
    names = param_names(params)
    labels = jax.tree.map(lambda n: "frozen" if re.search(pattern, n) else "train", names)
    count, total = sum(label == "frozen" for label in jax.tree.leaves(labels)), len(
        jax.tree.leaves(labels))
    if total and count in (0, total):  # (optax.tree_map_params calls this with no leaves)
        raise UserError(f"config optim.freeze={pattern!r} matches {'no' if not count else 'every'}"
                        f" parameter; names look like {', '.join(jax.tree.leaves(names)[:3])}")
    return labels


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    try:
        re.compile(cfg.freeze)
    except re.error as e:
        raise UserError(f"config optim.freeze={cfg.freeze!r} is not a regular expression: {e}"
                        ) from None
    # Clipping (optim.clip_norm) is done by the train step: the global norm of FSDP
    # gradients needs a sum over the shards, which an elementwise optax chain cannot see.
    tx = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                     weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.freeze:  # frozen params get no optimizer state and no update
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: frozen_labels(cfg.freeze, params))
    if cfg.layer_decay < 1:  # scales the whole AdamW update, decay term included (timm)
        tx = optax.chain(tx, optax.stateless(lambda updates, _: jax.tree.map(
            lambda u, m: u * m, updates, layer_multipliers(updates, cfg.layer_decay))))
    return tx

"""Train state, loss, and the pure train/eval steps under jax.shard_map.

Every collective is written out: each device differentiates the sum of its rows' losses
with respect to a device-varying copy of the params; explicit psums then sum gradients and
metric counts (replicated params over ('data', 'fsdp'), FSDP shards over 'data' after the
reduce-scatter that autodiff makes of their all-gather), and dividing by the global count
of valid rows gives the gradient of the global mean loss. Clipping by the global norm and
the optimizer run on each device's shards, the norm's squares summed explicitly.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitpod import mixing, model, parallel
from vitpod.mesh import BATCH_AXES


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def state_initializer(config: ml_collections.ConfigDict, num_classes: int,
                      tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    """A jitted (params or None) -> {step, params, opt_state[, ema_params]}, already sharded
    (FSDP shards over 'fsdp', the rest replicated).

    None initialises fresh params from the seed; given params (e.g. imported weights) are
    placed as they are. `jax.eval_shape(init, None)` is the abstract state that checkpoints
    restore into, so a resumed run never initialises params it would throw away. With
    `optim.ema_decay` the state also holds an EMA of the params, starting at the params.
    """
    def init(params):
        if params is None:
            params = model.init_params(config.model, config.data.image_size, num_classes,
                                       jax.random.key(config.seed))
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        if config.optim.ema_decay:
            state["ema_params"] = jax.tree.map(jnp.copy, params)
        return state
    specs = parallel.state_specs(jax.eval_shape(init, None), tx, mesh.shape["fsdp"])
    return jax.jit(init, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def eval_params(state: dict) -> dict:
    """The params to evaluate and export: the EMA when the run keeps one."""
    return state.get("ema_params", state["params"])


def ema_update(ema: dict, params: dict, decay: float) -> dict:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def normalize(images_u8, mean, std):
    """uint8 images -> float32 (x / 255 - mean) / std, per channel: the model's input."""
    x = images_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _gatherer(param_specs):
    """model.apply's `gather` for these specs: all-gathers of the sharded leaves."""
    outer = {k: v for k, v in param_specs.items() if k != "blocks"}
    block = param_specs["blocks"][0]  # every block has the same shapes and specs
    return lambda tree, is_block: parallel.gather(tree, block if is_block else outer)


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict, pack: bool | None = None):
    """jit(state, batch) -> (state, metrics) over the global batch.

    With `grad_accum_steps` > 1 each device runs its rows as that many microbatches in a
    scan, summing gradients and counts; losses are sums over rows, so the step equals the
    unaccumulated one (up to float summation order) with a fraction of the activations.
    Randomness (mixing, dropout, stochastic depth) comes from (seed, step, global row), so
    it too is the same for every layout and accumulation.
    """
    if pack is None:
        pack = jax.default_backend() == "cpu"
    accum_steps, data_cfg = config.grad_accum_steps, config.data
    mix, smoothing = mixing.enabled(config.mix), config.label_smoothing
    dropping = config.model.dropout > 0 or config.model.drop_path > 0
    clip, fsdp = config.optim.clip_norm, mesh.shape["fsdp"]

    def local_step(specs, state, images, labels, valid):
        gather = _gatherer(specs["params"]) if fsdp > 1 else None

        def grads_and_sums(params_varying, images, labels, valid, rows, step_key):
            x = normalize(images, data_cfg.mean, data_cfg.std)
            targets = None
            if mix or smoothing:
                num_classes = params_varying["head"]["bias"].shape[0] * (
                    fsdp if parallel.is_sharded(specs["params"]["head"]["bias"]) else 1)
                targets = mixing.smoothed(labels, num_classes, smoothing)
            if mix:
                x, targets = mixing.mix(jax.random.fold_in(step_key, 0), x, targets, config.mix)
            row_keys = None
            if dropping:
                dropout_key = jax.random.fold_in(step_key, 1)
                row_keys = jax.vmap(lambda r: jax.random.fold_in(dropout_key, r))(rows)

            def loss_sum_fn(params):
                logits = model.apply(graphdef, params, x, row_keys, gather)
                losses = (_cross_entropy(logits, labels) if targets is None else
                          optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))
                return (losses * valid).sum(), logits

            (loss_sum, logits), grad_sums = jax.value_and_grad(loss_sum_fn, has_aux=True)(
                params_varying)
            return grad_sums, {"loss": loss_sum,
                               "correct": ((logits.argmax(-1) == labels) * valid).sum(),
                               "count": valid.sum(), "skipped": (1 - valid).sum()}

        # Differentiate w.r.t. a device-varying copy: no implicit psum, ours are explicit.
        params_varying = parallel.varying(state["params"], specs["params"])
        step_key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        n = images.shape[0]
        rows = jax.lax.axis_index(BATCH_AXES) * n + jnp.arange(n)  # global row numbers
        micro = jax.tree.map(lambda a: a.reshape(accum_steps, -1, *a.shape[1:]),
                             (images, labels, valid, rows))
        total = grads_and_sums(params_varying, *jax.tree.map(lambda a: a[0], micro), step_key)
        if accum_steps > 1:
            def add_one(carry, batch):
                return jax.tree.map(jnp.add, carry,
                                    grads_and_sums(params_varying, *batch, step_key)), None
            total, _ = jax.lax.scan(add_one, total, jax.tree.map(lambda a: a[1:], micro))
        grad_sums, sums = parallel.sum_over_batch(*total, specs["params"], pack)
        count = jnp.maximum(sums["count"], 1)
        grads = jax.tree.map(lambda g: g / count, grad_sums)  # gradient of the global mean
        grad_norm = parallel.global_norm(grads, specs["params"])
        if clip > 0:  # optax's clip_by_global_norm, with the norm over all shards
            grads = jax.tree.map(lambda g: jnp.where(grad_norm < clip, g, g / grad_norm * clip),
                                 grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        if "ema_params" in state:
            new_state["ema_params"] = ema_update(state["ema_params"], new_state["params"],
                                                 config.optim.ema_decay)
        metrics = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count,
                   "grad_norm": grad_norm, "skipped": sums["skipped"]}
        return new_state, metrics

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        specs = parallel.state_specs(state, tx, fsdp)
        sharded = jax.shard_map(functools.partial(local_step, specs), mesh=mesh,
                                in_specs=(specs, P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES)),
                                out_specs=(specs, P()))
        return sharded(state, batch["image"], batch["label"], batch["valid"])

    return train_step


def make_eval_step(graphdef, mesh: jax.sharding.Mesh, data_cfg: ml_collections.ConfigDict):
    """jit(params, batch) -> sums over the valid rows of the batch: loss, correct (top-1),
    top5 (label among the 5 highest logits, ties counted for the label) and count, and per
    class (vectors indexed by label) class_correct and class_count."""
    fsdp = mesh.shape["fsdp"]

    def local_eval(param_specs, params, images, labels, valid):
        gather = _gatherer(param_specs) if fsdp > 1 else None
        logits = model.apply(graphdef, params, normalize(images, data_cfg.mean, data_cfg.std),
                             gather=gather).astype(jnp.float32)
        hits = (logits.argmax(-1) == labels) * valid
        label_logit = jnp.take_along_axis(logits, labels[:, None], -1)
        above = (logits > label_logit).sum(-1)  # classes ranked strictly above the label
        per_class = functools.partial(jax.ops.segment_sum, segment_ids=labels,
                                      num_segments=logits.shape[-1])
        sums = {"loss": (_cross_entropy(logits, labels) * valid).sum(),
                "correct": hits.sum(), "top5": ((above < 5) * valid).sum(),
                "count": valid.sum(), "class_correct": per_class(hits),
                "class_count": per_class(valid)}
        return jax.lax.psum(sums, BATCH_AXES)

    @jax.jit
    def eval_step(params, batch):
        specs = parallel.param_specs(params, fsdp)
        sharded = jax.shard_map(functools.partial(local_eval, specs), mesh=mesh,
                                in_specs=(specs, P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES)),
                                out_specs=P())
        return sharded(params, batch["image"], batch["label"], batch["valid"])

    return eval_step

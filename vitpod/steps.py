"""Train state, loss, and the pure train/eval steps under jax.shard_map.

Every collective is written out: each device differentiates its share of the global mean
loss with respect to a device-varying copy of the params, then the gradients are summed
over the batch axes with one explicit psum (the gradient all-reduce of data parallelism).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitpod import model
from vitpod.distributed import BATCH_AXES


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_initializer(model_cfg, image_size: int, num_classes: int,
                      tx: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh):
    """A jitted () -> {step, params, opt_state} that creates the state already sharded.

    `jax.eval_shape` of it gives the abstract state that checkpoints restore into, so a
    resumed run never initialises params it would throw away.
    """
    def init():
        params = model.init_params(model_cfg, image_size, num_classes, jax.random.key(seed))
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params)}
    return jax.jit(init, out_shardings=replicated(mesh))


def _normalize(images_u8, mean, std):
    x = images_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    data_cfg: ml_collections.ConfigDict):
    """jit(state, batch) -> (state, metrics); metrics are sums over the global batch."""

    def local_step(state, images, labels, valid):
        x = _normalize(images, data_cfg.mean, data_cfg.std)
        count = jax.lax.psum(valid.sum(), BATCH_AXES)

        def loss_fn(params):
            logits = model.apply(graphdef, params, x)
            # This device's share of the global mean: sum over local rows / global count.
            return (_cross_entropy(logits, labels) * valid).sum() / jnp.maximum(count, 1), logits

        params_varying = jax.lax.pcast(state["params"], BATCH_AXES, to="varying")
        (local_loss, logits), local_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params_varying)
        grads = jax.lax.psum(local_grads, BATCH_AXES)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        correct = ((logits.argmax(-1) == labels) * valid).sum()
        metrics = {"loss": jax.lax.psum(local_loss, BATCH_AXES),
                   "accuracy": jax.lax.psum(correct, BATCH_AXES) / jnp.maximum(count, 1),
                   "grad_norm": optax.tree.norm(grads),
                   "skipped": jax.lax.psum((1 - valid).sum(), BATCH_AXES)}
        return new_state, metrics

    sharded = jax.shard_map(local_step, mesh=mesh,
                            in_specs=(P(), P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES)),
                            out_specs=(P(), P()))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        return sharded(state, batch["image"], batch["label"], batch["valid"])

    return train_step


def make_eval_step(graphdef, mesh: jax.sharding.Mesh, data_cfg: ml_collections.ConfigDict):
    """jit(params, batch) -> sums of loss, correct and count over valid rows of the batch."""

    def local_eval(params, images, labels, valid):
        logits = model.apply(graphdef, params, _normalize(images, data_cfg.mean, data_cfg.std))
        sums = {"loss": (_cross_entropy(logits, labels) * valid).sum(),
                "correct": ((logits.argmax(-1) == labels) * valid).sum(),
                "count": valid.sum()}
        return jax.lax.psum(sums, BATCH_AXES)

    sharded = jax.shard_map(local_eval, mesh=mesh,
                            in_specs=(P(), P(BATCH_AXES), P(BATCH_AXES), P(BATCH_AXES)),
                            out_specs=P())
    return jax.jit(lambda params, batch: sharded(params, batch["image"], batch["label"],
                                                 batch["valid"]))

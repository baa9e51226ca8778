"""How long an async checkpoint save blocks the training loop, as a fraction of a step.

    python benchmarks/checkpoint_stall.py --variant=S/16 --image_size=224 --global_batch=8

Prints one JSON line: step_seconds, save_blocking_seconds (the time `checkpoint.save`
holds the loop), stall_in_steps, and for comparison sync_save_seconds (a blocking save of
the same state, the baseline).
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("variant", "S/16", "Model variant.")
flags.DEFINE_integer("image_size", 224, "")
flags.DEFINE_integer("global_batch", 8, "")
FLAGS = flags.FLAGS


def main(argv) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.conftest import load_config
    from vitpod import checkpoint, model, optim, steps

    config = load_config("tiny", model__variant=FLAGS.variant, data__image_size=FLAGS.image_size)
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    tx = optim.make(config.optim, 100)
    state = steps.state_initializer(config, 1000, tx, mesh)(None)
    graphdef, _ = model.abstract_model(config.model, FLAGS.image_size, 1000)
    train_step = steps.make_train_step(graphdef, tx, mesh, config)
    b, size = FLAGS.global_batch, FLAGS.image_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, 1000, b).astype(np.int32), "valid": np.ones(b, np.float32)}
    batch = {k: jax.device_put(v, steps.batch_sharding(mesh)) for k, v in batch.items()}
    for _ in range(2):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(state)
    t = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(state)
    step_seconds = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        mngr = checkpoint.manager(os.path.join(tmp, "async"), keep=2)
        checkpoint.save(mngr, 1, state)  # warm-up: first save sets up orbax
        mngr.wait_until_finished()
        t = time.perf_counter()
        checkpoint.save(mngr, 2, state)
        blocking = time.perf_counter() - t
        mngr.wait_until_finished()
        total = time.perf_counter() - t
        mngr.close()
        import orbax.checkpoint as ocp

        t = time.perf_counter()
        blocking_checkpointer = ocp.StandardCheckpointer()
        blocking_checkpointer.save(os.path.join(tmp, "sync"), state)
        blocking_checkpointer.wait_until_finished()
        blocking_checkpointer.close()
        sync = time.perf_counter() - t
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(json.dumps({"impl": "vitpod async save", "variant": FLAGS.variant,
                      "params": int(params), "step_seconds": round(step_seconds, 3),
                      "save_blocking_seconds": round(blocking, 3),
                      "save_total_seconds": round(total, 3),
                      "stall_in_steps": round(blocking / step_seconds, 3),
                      "sync_save_seconds": round(sync, 3)}))


if __name__ == "__main__":
    app.run(main)

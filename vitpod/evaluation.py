"""The one evaluation loop: the sharded eval step over every image of a split, for training's
eval rows and the `evaluate` entrypoint alike."""

import jax
import ml_collections
import numpy as np

from vitpod import mesh as mesh_lib
from vitpod import steps
from vitpod.data import imagefolder, pipeline


def eval_split(eval_step, params, split: imagefolder.Split, data_cfg: ml_collections.ConfigDict,
               global_batch: int, mesh: jax.sharding.Mesh) -> dict:
    """Exact metrics over every readable image of `split` (padding and skips masked out),
    from `steps.make_eval_step`'s sums: loss, accuracy, top-5, count, skipped, per class."""
    sums: dict[str, np.ndarray] = {}
    sharding = steps.batch_sharding(mesh)
    batches = pipeline.eval_batches(split, data_cfg, global_batch,
                                    mesh_lib.this_host_rows(sharding, global_batch))
    warn = pipeline.SkipWarner(split)
    for host_batch in batches:
        warn(host_batch)
        batch = pipeline.to_global(host_batch, sharding, global_batch)
        out = jax.device_get(eval_step(params, batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
    count = int(sums["count"])
    n = max(count, 1)
    return {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n,
            "top5_accuracy": float(sums["top5"]) / n, "count": count,
            "skipped": len(split.files) - count,
            "per_class_accuracy": {c: float(sums["class_correct"][i] / max(
                sums["class_count"][i], 1)) for i, c in enumerate(split.classes)}}

"""The training loop of one launch: from its first step to the last, a stop or a preemption;
train, log, save and evaluate at their intervals."""

import dataclasses
import time
from collections.abc import Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from vitpod import checkpoint, evaluation, metrics, model, optim, steps
from vitpod import config as config_lib
from vitpod import mesh as mesh_lib
from vitpod.data import imagefolder, pipeline
from vitpod.preemption import Preemption, SaveClock
from vitpod.workdir import goodput


@dataclasses.dataclass(frozen=True)
class Loop:
    """What the loop runs with, fixed for a launch."""

    config: ml_collections.ConfigDict
    splits: dict[str, imagefolder.Split]
    mesh: Mesh
    tx: optax.GradientTransformation
    ckpt: object  # orbax's CheckpointManager
    writer: metrics.Writer
    preemption: Preemption
    record: goodput.Record
    tracer: metrics.Tracer
    stop_after: int = 0
    check_lease: Callable[[], None] = lambda: None


def eval_row(eval_step, params, split: imagefolder.Split, config, mesh) -> dict:
    """The eval row: exact metrics over every readable image of `split` (evaluation.eval_split)."""
    result = evaluation.eval_split(eval_step, params, split, config.data,
                                   config_lib.eval_batch_size(config), mesh)
    return {f"eval/{k}": result[k] for k in ("loss", "accuracy", "top5_accuracy", "count",
                                            "skipped")}


def run(loop: Loop, state, start: int) -> dict:
    """The loop from step start+1: train, log, save, evaluate; returns the last metrics."""
    config, splits, mesh, record = loop.config, loop.splits, loop.mesh, loop.record
    num_classes = len(splits["train"].classes)
    graphdef, _ = model.abstract_model(config.model, config.data.image_size, num_classes)
    train_step = steps.make_train_step(graphdef, loop.tx, mesh, config)
    eval_step = steps.make_eval_step(graphdef, mesh, config.data)
    lr_at = optim.schedule(config.optim, config.total_steps)
    progress = metrics.Progress(start, config.total_steps, config.batch_size)
    sharding = steps.batch_sharding(mesh)
    batches = pipeline.train_batches(splits["train"], config.data, config.seed,
                                     config.batch_size, start, config.total_steps,
                                     mesh_lib.this_host_rows(sharding, config.batch_size))
    warn = pipeline.SkipWarner(splits["train"])
    clock = SaveClock(config.save_every_minutes)
    window, fetched, skipped, final, step = [], [], 0.0, {}, start
    waited = 0.0  # seconds the loop spent waiting for input since the last log row
    for step in range(start + 1, config.total_steps + 1):
        loop.tracer.at(step, state)
        before = time.perf_counter()
        host_batch = next(batches)
        waited += time.perf_counter() - before
        warn(host_batch)
        batch = pipeline.to_global(host_batch, sharding, config.batch_size)
        state, step_metrics = train_step(state, batch)
        if step == start + 1:  # one sync per launch: when its first step is done
            jax.block_until_ready(state)
            record.first_step()
        window.append(step_metrics)  # fetched only at log and save steps: no per-step sync
        last = step == config.total_steps
        stop = ("stopped as asked" if step == loop.stop_after and not last else
                "preempted" if loop.preemption.reached(step) else "")
        log = step % config.log_every == 0 or last or bool(stop)
        save = step % config.save_every == 0 or last or bool(stop) or (log and clock.due())
        if log or save:
            fetched += metrics.fetch_finite(window, step)  # never save a state that saw a NaN
            window = []
        if log:
            row, skipped = metrics.train_row(fetched, skipped, float(lr_at(step - 1)))
            row["train/img_per_sec"], seconds = progress.tick(step)
            row["train/data_wait"] = waited / max(seconds, 1e-9)
            waited = 0.0
            loop.check_lease()  # before writing: a run that lost the workdir writes no more
            loop.writer.write(step, row)
            record.progress(step)
            if jax.process_index() == 0:
                progress.line(step, row)
            fetched, final = [], {**final, **row}
            metrics.check_skips(skipped, (step - start) * config.batch_size, config.data)
        if save:
            checkpoint.save(loop.ckpt, step, state)
            record.saving(step)
            clock.saved()
        if "val" in splits and ((config.eval_every and step % config.eval_every == 0) or last):
            evaluated = eval_row(eval_step, steps.eval_params(state), splits["val"], config, mesh)
            final.update(metrics.log_eval(loop.writer, step, evaluated))
        if stop:
            return {**final, "step": step, "stopped": stop}
    if start == config.total_steps and "val" in splits:  # stopped between last save and DONE
        evaluated = eval_row(eval_step, steps.eval_params(state), splits["val"], config, mesh)
        final.update(metrics.log_eval(loop.writer, step, evaluated))
    return {**final, "step": step}

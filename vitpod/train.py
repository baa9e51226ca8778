"""Train a ViT: `run(config, workdir)` and its absl entrypoint.

    python -m vitpod.train --config=configs/demo.py --workdir=runs/demo [--config.KEY=VALUE]

Relaunching the same command with the same workdir continues from the latest checkpoint;
a finished run (DONE in the workdir) says so and exits 0.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vitpod import checkpoint, cli, distributed, metrics, model, optim, steps
from vitpod import config as config_lib
from vitpod.data import imagefolder, pipeline
from vitpod.errors import UserError


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str, primary: bool) -> None:
    """Refuse a workdir whose run computed different numbers; record this run's config."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            changed = config_lib.changed_result_keys(json.load(f), config)
        if changed:
            raise UserError(
                f"workdir {workdir!r} holds a run with a different config ({', '.join(changed)}"
                "); resume with the same values, or use a new --workdir")
    elif primary:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config_lib.to_json(config))


def evaluate(eval_step, params, split: imagefolder.Split, config, mesh) -> dict:
    """Exact metrics over every readable image of `split` (padding and skips masked out)."""
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    batches = pipeline.eval_batches(split, config.data, config_lib.eval_batch_size(config),
                                    jax.process_index(), jax.process_count())
    warn = pipeline.SkipWarner(split)
    for host_batch in batches:
        warn(host_batch)
        out = eval_step(params, pipeline.to_global(host_batch, steps.batch_sharding(mesh)))
        for k, v in jax.device_get(out).items():
            sums[k] += float(v)
    count = sums["count"]
    return {"eval/loss": sums["loss"] / max(count, 1), "eval/accuracy": sums["correct"] / max(
        count, 1), "eval/count": int(count), "eval/skipped": len(split.files) - int(count)}


def run(config: ml_collections.ConfigDict, workdir: str, stop_after: int = 0) -> dict:
    """Train to config.total_steps in workdir, resuming if it holds a checkpoint.

    Returns the final metrics (also written to workdir/DONE). With `stop_after`, stops at
    that step with a checkpoint and no DONE, to continue later on the same schedule.
    """
    primary = jax.process_index() == 0
    model.parse_variant(config.model.variant)
    config_lib.validate(config, jax.device_count(), jax.process_count())
    done_path = os.path.join(workdir, "DONE")
    if os.path.exists(done_path):
        with open(done_path) as f:
            final = json.load(f)
        logging.info("run in %s already finished at step %d; nothing to do", workdir,
                     final.get("step", config.total_steps))
        return final
    _prepare_workdir(config, workdir, primary)

    manifest_path = os.path.join(workdir, "manifest.json")
    splits = imagefolder.load_or_scan(manifest_path, config.data.train_dir, config.data.val_dir)
    if primary and not os.path.exists(manifest_path):
        imagefolder.save(manifest_path, splits)
    train_split = splits["train"]
    num_classes = len(train_split.classes)
    logging.info("train: %d images in %d classes from %s", len(train_split.files), num_classes,
                 train_split.root)

    mesh = distributed.make_mesh(config.mesh)
    tx = optim.make(config.optim, config.total_steps)
    lr_at = optim.schedule(config.optim, config.total_steps)
    graphdef, _ = model.abstract_model(config.model, config.data.image_size, num_classes)
    init = steps.state_initializer(config.model, config.data.image_size, num_classes, tx,
                                   config.seed, mesh)
    ckpt = checkpoint.manager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                              config.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        start, state = 0, init()
    else:
        logging.info("resuming from the checkpoint of step %d", start)
        state = checkpoint.restore(ckpt, start, jax.eval_shape(init))

    train_step = steps.make_train_step(graphdef, tx, mesh, config.data)
    eval_step = steps.make_eval_step(graphdef, mesh, config.data)
    writer = metrics.Writer(workdir, primary)
    progress = metrics.Progress(start, config.total_steps, config.batch_size)
    batches = pipeline.train_batches(train_split, config.data, config.seed, config.batch_size,
                                     start, config.total_steps, jax.process_index(),
                                     jax.process_count())
    warn = pipeline.SkipWarner(train_split)
    sharding = steps.batch_sharding(mesh)
    window, skipped, final, step, pause = [], 0.0, {}, start, False
    for step in range(start + 1, config.total_steps + 1):
        host_batch = next(batches)
        warn(host_batch)
        state, step_metrics = train_step(state, pipeline.to_global(host_batch, sharding))
        window.append(step_metrics)  # fetched only at log steps: no per-step host sync
        last = step == config.total_steps
        pause = step == stop_after and not last
        if step % config.log_every == 0 or last or pause:
            row, skipped = _train_row(jax.device_get(window), skipped, float(lr_at(step - 1)))
            row["train/img_per_sec"] = progress.tick(step)
            writer.write(step, row)
            if primary:
                progress.line(step, row, row["train/img_per_sec"])
            window, final = [], {**final, **row}
            _check_skips(skipped, (step - start) * config.batch_size, config.data)
        if step % config.save_every == 0 or last or pause:
            checkpoint.save(ckpt, step, state)
        if "val" in splits and ((config.eval_every and step % config.eval_every == 0) or last):
            final.update(_log_eval(writer, step, evaluate(eval_step, state["params"],
                                                          splits["val"], config, mesh)))
        if pause:
            break
    if start == config.total_steps and "val" in splits:  # stopped between last save and DONE
        final.update(_log_eval(writer, step, evaluate(eval_step, state["params"],
                                                      splits["val"], config, mesh)))
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
    final["step"] = step
    if pause:
        logging.info("stopped at step %d as asked; relaunch to continue", step)
    elif primary:
        with open(done_path, "w") as f:
            json.dump(final, f)
    return final


def _train_row(fetched: list[dict], skipped: float, lr: float) -> tuple[dict, float]:
    """The log row of the steps since the last one, and the running count of skipped images."""
    skipped += sum(float(m["skipped"]) for m in fetched)
    row = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
           "train/accuracy": float(np.mean([m["accuracy"] for m in fetched])),
           "train/grad_norm": float(fetched[-1]["grad_norm"]),
           "train/lr": lr, "train/skipped": int(skipped)}
    return row, skipped


def _log_eval(writer: metrics.Writer, step: int, row: dict) -> dict:
    writer.write(step, row)
    logging.info("step %d  eval accuracy %.4f  loss %.4f  (%d images)", step,
                 row["eval/accuracy"], row["eval/loss"], row["eval/count"])
    return row


def _check_skips(skipped: float, seen: int, data_cfg) -> None:
    if skipped > max(1, data_cfg.max_skipped_fraction * seen):
        raise UserError(f"{int(skipped)} of {seen} training images were unreadable, more than "
                        f"data.max_skipped_fraction={data_cfg.max_skipped_fraction}; fix or "
                        "remove them (the log names each) or raise that key")


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 "
                                   "(local multi-process runs; not needed on TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", 0, "Stop at this step with a checkpoint, to continue the same schedule later; "
    "0: run to the end.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.config(_CONFIG)
    if not _WORKDIR.value:
        raise UserError("pass --workdir=DIR (where checkpoints and metrics go)")
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    final = run(config, _WORKDIR.value, _STOP_AFTER.value)
    if final["step"] < config.total_steps:
        print(f"stopped at step {final['step']} of {config.total_steps}; relaunch to continue")
    elif "eval/accuracy" in final:
        print(f"final validation accuracy: {final['eval/accuracy']:.4f} "
              f"({final['eval/count']} images)")
    else:
        print(f"finished {config.total_steps} steps (no data.val_dir, so no validation)")


if __name__ == "__main__":
    cli.run(main)

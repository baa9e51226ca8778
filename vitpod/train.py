"""Train a ViT: `run(config, workdir)` and its absl entrypoint.

    python -m vitpod.train --config=configs/demo.py --workdir=runs/demo [--config.KEY=VALUE]

Relaunching the same command with the same workdir continues from the latest checkpoint;
a finished run (DONE in the workdir) says so and exits 0.
"""

import dataclasses
import json
import sys
import time
from collections.abc import Callable

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from vitpod import (
    checkpoint,
    cli,
    distributed,
    loop,
    metrics,
    model,
    optim,
    protocol,
    steps,
    storage,
)
from vitpod import config as config_lib
from vitpod import mesh as mesh_lib
from vitpod.data import imagefolder, pipeline, shared_memory
from vitpod.errors import UserError
from vitpod.formats import detect, hf
from vitpod.preemption import Preemption, Stopped, stop_before_training
from vitpod.workdir import files as workdir_files
from vitpod.workdir import goodput, lease
from vitpod.workdir.markers import mark

_PROCESS_START = time.time()  # this module's import: a launch's start, before JAX's start-up


STOPPED_AT_START = "preempted before the first step"


def run(config: ml_collections.ConfigDict, workdir: str, stop_after: int = 0,
        profile: str = "", start_time: float | None = None, start_over: bool = False) -> dict:
    """Train to config.total_steps in workdir, resuming if it holds a checkpoint.

    Returns the final metrics (also written to workdir/DONE). Stops early, with a checkpoint
    and no DONE, at `stop_after` or when preempted (SIGTERM); `final["stopped"]` says why
    (STOPPED_AT_START, without a step: a SIGTERM before training began, nothing to save).
    `profile="START:COUNT"` traces steps START..START+COUNT-1 with jax.profiler.
    `start_time` (default: now) is when the launch began, for its goodput record.
    `start_over` trains from step 0 although the launch records show a checkpoint now gone.
    """
    try:
        with stop_before_training():
            return _run(config, workdir, stop_after, profile, start_time, start_over)
    except Stopped:
        logging.warning("got SIGTERM before the first step: stopped, with nothing to save")
        return {"stopped": STOPPED_AT_START}


def _run(config, workdir, stop_after, profile, start_time, start_over) -> dict:
    init_from = None  # the pretrained checkpoint, read when its shape or weights are needed
    if config.model.init_from:
        recorded = workdir_files.recorded_architecture(workdir, config.model.init_from)
        if recorded:  # a resume: the shape adopted at the first launch, no download again
            config.model.update(recorded)
            logging.info("model.init_from: the architecture recorded in %s/config.json (%s)",
                         workdir, config.model.variant)
        else:
            init_from = detect.read(config.model.init_from)
            detect.adopt(config.model, init_from)
    model.parse_variant(config.model.variant)
    config_lib.validate(config, jax.device_count(), jax.process_count(),
                        mesh_lib.num_slices())
    _check_model(config)
    tracer = metrics.Tracer(profile, workdir)
    done_path = protocol.done_path(workdir)
    if storage.exists(done_path):
        final = storage.read_json(done_path, "delete it and relaunch: the run resumes from its "
                                  "last checkpoint and writes DONE again", protocol.DONE_SHAPE)
        workdir_files.check_finished(config, workdir, final["step"])
        logging.info("run in %s already finished at step %d; nothing to do", workdir,
                     final.get("step", config.total_steps))
        return final
    distributed.check_same_config(config, workdir)
    workdir_files.enable_compile_cache(config.compile_cache, workdir)
    manifest_path = storage.join(workdir, "manifest.json")

    distributed.primary_first(lambda: workdir_files.record_run(config, workdir, manifest_path),
                              "check the workdir and record the run")
    with lease.held(workdir, config.lease_timeout_minutes) as check_lease:
        return _run_leased(_Launch(config, workdir, stop_after, start_over, start_time,
                                   tracer, init_from, manifest_path, done_path, check_lease))


def _check_model(config) -> None:
    """The config errors that only building the model and its optimizer finds (a patch size
    that does not divide data.image_size, optim.freeze matching nothing), found abstractly
    before anything is written to the workdir."""
    _, params = model.abstract_model(config.model, config.data.image_size, 2)
    jax.eval_shape(optim.make(config.optim, config.total_steps).init, params)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One launch of run(), as the leased part needs it."""

    config: ml_collections.ConfigDict
    workdir: str
    stop_after: int
    start_over: bool
    start_time: float | None
    tracer: metrics.Tracer
    init_from: object  # a checkpoint read by formats.detect, or None until needed
    manifest_path: str
    done_path: str
    check_lease: Callable[[], None]


def _run_leased(launch: _Launch) -> dict:
    """run() from the restore on, while process 0 holds the workdir's lease."""
    config, workdir, stop_after = launch.config, launch.workdir, launch.stop_after
    tracer, done_path = launch.tracer, launch.done_path
    splits = imagefolder.load(launch.manifest_path)
    logging.info("train: %d images in %d classes from %s", len(splits["train"].files),
                 len(splits["train"].classes), splits["train"].root)
    logging.info("decode worker processes per host: %d (data.num_workers=%d)",
                 pipeline.decode_workers(config.data.num_workers), config.data.num_workers)
    host_rows = (config.batch_size + (config_lib.eval_batch_size(config) if "val" in splits
                                      else 0)) // jax.process_count()
    shared_memory.check(pipeline.decode_workers(config.data.num_workers),
                        shared_memory.batch_bytes(host_rows, config.data.image_size))

    mesh = mesh_lib.make_mesh(config.mesh)
    logging.info("mesh data=%d x fsdp=%d over %d slice(s)", mesh.shape["data"],
                 mesh.shape["fsdp"], mesh_lib.num_slices())
    logging.info("host %d of %d holds batch rows %s", jax.process_index(), jax.process_count(),
                 mesh_lib.runs_text(mesh_lib.this_host_rows(steps.batch_sharding(mesh),
                                                            config.batch_size)))
    tx = optim.make(config.optim, config.total_steps)
    num_classes = len(splits["train"].classes)
    init = steps.state_initializer(config, num_classes, tx, mesh)
    checkpoints = storage.join(storage.absolute(workdir), "checkpoints")
    if not launch.start_over:
        distributed.primary_first(lambda: goodput.check_kept(
            workdir, checkpoints, checkpoint.listed(checkpoints)), "check the checkpoints")
    ckpt = checkpoint.manager(checkpoints, config.keep_checkpoints)
    record = goodput.Record(workdir, jax.process_index() == 0, launch.start_time or time.time())
    before = time.time()
    start, state = checkpoint.restore_latest(ckpt, jax.eval_shape(init, None))
    if 0 < stop_after <= start < config.total_steps:
        ckpt.close()
        logging.warning("the run is at step %d, not before --stop_after=%d: nothing to train",
                        start, stop_after)
        return {"step": start, "stopped": "nothing to train: already past --stop_after"}
    record.started(start, time.time() - before, jax.process_count(), jax.device_count(),
                   jax.devices()[0].platform)
    if state is None:
        weights = None
        if config.model.init_from:
            init_from = launch.init_from or detect.read(config.model.init_from)
            weights = hf.load_params(init_from, config.model, config.data.image_size,
                                     splits["train"].classes)
        state = init(weights)
    else:
        logging.info("resuming from the checkpoint of step %d", start)
    preemption = metrics_writer = None
    try:
        preemption = Preemption()
        metrics_writer = metrics.Writer(workdir, jax.process_index() == 0)
        final = loop.run(loop.Loop(config, splits, mesh, tx, ckpt, metrics_writer, preemption,
                                   record, tracer, stop_after, launch.check_lease), state,
                             start)
        ckpt.wait_until_finished()
        record.saves_finished()
    except BaseException as e:
        step = (record.data.get("progress") or {}).get("step", start)
        try:
            record.ended("crashed", step, f"{type(e).__name__}: {e}"[:500])
        except Exception as not_recorded:  # noqa: BLE001  e.g. the disk is full: report e
            logging.warning("could not record the crash: %s", not_recorded)
        raise
    finally:
        tracer.close()
        ckpt.close()
        if metrics_writer:
            metrics_writer.close()
        if preemption:
            preemption.close()
    if final.get("stopped"):
        record.ended("preempted" if final["stopped"] == "preempted" else "stopped",
                     final["step"])
        logging.info("%s at step %d, checkpoint saved; relaunch the same command to continue",
                     final["stopped"], final["step"])
    elif jax.process_index() == 0:
        record.ended("done", final["step"])
        final["goodput"] = goodput.summarize(goodput.read_records(workdir))
        storage.write_text(done_path, json.dumps(final))
    return final


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (local "
                        "multi-process runs; not needed on TPU pods).")
    flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
    flags.DEFINE_integer("process_id", -1, "This process's index.")
    flags.DEFINE_string("profile", "", "START:COUNT: trace COUNT steps from step START with "
                        "jax.profiler into WORKDIR/profile (./profile for a gs:// workdir); "
                        "open it with TensorBoard's profile plugin or Perfetto.")
    flags.DEFINE_integer("stop_after", 0, "Stop at this step with a checkpoint, to continue "
                         "the same schedule later; 0: run to the end.")
    flags.DEFINE_string("expect_platform", "", "Stop at start unless JAX's devices are of this "
                        "platform (tpu, cpu); make pod-launch sets it.")
    flags.DEFINE_integer("expect_devices", 0, "Stop at start unless the job has this many "
                         "devices in all; make pod-launch sets it from the slice type.")
    flags.DEFINE_bool("start_over", False, "Train from step 0 although the launch records "
                      "show a checkpoint that is gone (checkpoints/ deleted or moved); "
                      "without it such a launch is refused.")
    flags.DEFINE_integer("exit_code_if_preempted", 0, "Exit with this code, on every process, "
                         "when a SIGTERM stopped the run (checkpoint saved, not DONE): the GKE "
                         "JobSet passes one its failure policy restarts.")


def main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; train takes only flags "
                        "(--config=FILE --workdir=DIR --config.KEY=VALUE ...)")
    config = cli.config(flags.FLAGS.config)
    if not flags.FLAGS.workdir:
        raise UserError("pass --workdir=DIR (where checkpoints and metrics go)")
    f = flags.FLAGS
    cli.check_workdir(f.workdir)
    if f.stop_after < 0:
        raise UserError(f"--stop_after={f.stop_after} must be >= 0 (0: run to the end)")
    mark(f.workdir, protocol.JOINING)
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    found = distributed.check_devices(f.expect_platform, f.expect_devices)
    logging.info("process %d of %d: %s", jax.process_index(), jax.process_count(), found)
    mark(f.workdir, protocol.READY, process=jax.process_index(), devices=found)
    final = run(config, f.workdir, f.stop_after, f.profile, _PROCESS_START, f.start_over)
    if jax.process_index() == 0:
        _say_how_it_ended(final, config, f.stop_after)
    if final.get("stopped", "").startswith("preempted") and f.exit_code_if_preempted:
        sys.exit(f.exit_code_if_preempted)


def _say_how_it_ended(final: dict, config, stop_after: int) -> None:
    if final.get("stopped") == STOPPED_AT_START:
        print("stopped by SIGTERM before the first step: nothing was trained, so nothing to "
              "save; relaunch the same command to continue")
    elif final.get("stopped", "").startswith("nothing to train"):
        print(f"nothing to train: the run is at step {final['step']} of {config.total_steps}, "
              f"not before --stop_after={stop_after}; drop it or pass a later step")
    elif final.get("stopped"):
        print(f"{final['stopped']} at step {final['step']} of {config.total_steps}, checkpoint "
              "saved; relaunch the same command to continue")
    elif "eval/accuracy" in final:
        print(f"final validation accuracy: {final['eval/accuracy']:.4f} "
              f"({final['eval/count']} images)")
    else:
        print(f"finished {config.total_steps} steps (no data.val_dir, so no validation)")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

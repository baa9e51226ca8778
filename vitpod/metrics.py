"""How a run is observed: metrics rows to metrics.jsonl and TensorBoard (process 0 only),
the progress line, and jax.profiler traces of chosen steps."""

import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from absl import logging

from vitpod import storage
from vitpod.errors import UserError


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch
    whenever it is installed (only to accept its tensors), ~2 s of every launch's start-up."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """Appends one JSON object per call to metrics.jsonl and the same scalars to TensorBoard.

    For a gs:// workdir the event file is written locally and copied to the bucket after each
    row (with storage's retries), rather than through tensorboardX's own GCS writer, which
    uploads again when garbage-collected at exit.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.log = self.tb = None
        if enabled:
            SummaryWriter = _summary_writer_class()
            self.log = storage.Appender(storage.join(workdir, "metrics.jsonl"))
            self.tb_dir = storage.join(workdir, "tensorboard")
            self.local_tb = (tempfile.mkdtemp(prefix="vitpod-tb-") if storage.is_gcs(workdir)
                             else self.tb_dir)
            self.tb = SummaryWriter(self.local_tb)

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        self.log.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        self._copy_events()

    def _copy_events(self) -> None:
        if self.local_tb != self.tb_dir:
            for name in os.listdir(self.local_tb):
                with open(os.path.join(self.local_tb, name), "rb") as f:
                    storage.write_bytes(storage.join(self.tb_dir, name), f.read())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self._copy_events()
            if self.local_tb != self.tb_dir:
                shutil.rmtree(self.local_tb, ignore_errors=True)


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return round(value, 6) if isinstance(value, float) else value


class Progress:
    """Throughput over the last window and the ETA to the last step."""

    def __init__(self, start_step: int, total_steps: int, global_batch: int):
        self.total, self.batch = total_steps, global_batch
        self.last_step, self.last_time = start_step, time.perf_counter()

    def tick(self, step: int) -> tuple[float, float]:
        """(images per second, seconds) since the previous tick."""
        now = time.perf_counter()
        seconds = now - self.last_time
        rate = (step - self.last_step) * self.batch / max(seconds, 1e-9)
        self.last_step, self.last_time = step, now
        return rate, seconds

    def line(self, step: int, row: dict) -> None:
        img_per_sec = row["train/img_per_sec"]
        eta = (self.total - step) * self.batch / max(img_per_sec, 1e-9)
        logging.info("step %d/%d  loss %.4f  lr %.2e  %.0f img/s  data wait %.0f%%  eta %s",
                     step, self.total, row["train/loss"], row["train/lr"], img_per_sec,
                     100 * row["train/data_wait"], _duration(eta))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Tracer:
    """jax.profiler over a window of steps, given as "START:COUNT" ("" for none)."""

    def __init__(self, spec: str, workdir: str):
        self.start = self.end = 0
        self.running = False
        if spec:
            try:
                start, count = map(int, spec.split(":"))
            except ValueError:
                raise UserError(f"--profile={spec!r}: write START:COUNT, e.g. 10:5") from None
            self.start, self.end = start, start + count
        self.dir = "profile" if storage.is_gcs(workdir) else storage.join(workdir, "profile")

    def at(self, step: int, state) -> None:
        if step == self.start:
            jax.profiler.start_trace(self.dir)
            self.running = True
        elif step == self.end and self.running:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
            logging.info("traced steps %d-%d into %s", self.start, self.end - 1, self.dir)


def fetch_finite(window: list, last_step: int) -> list[dict]:
    """Host copies of the window's metrics; UserError naming the first non-finite step."""
    fetched = jax.device_get(window)
    for i, m in enumerate(fetched):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            bad = last_step - len(fetched) + 1 + i
            raise UserError(f"loss or gradients are not finite at step {bad}; the last good "
                            "checkpoint is kept. Lower optim.lr, raise optim.warmup_steps or "
                            "set optim.clip_norm")
    return fetched


def train_row(fetched: list[dict], skipped: float, lr: float) -> tuple[dict, float]:
    """The log row of the steps since the last one, and the running count of skipped images."""
    skipped += sum(float(m["skipped"]) for m in fetched)
    row = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
           "train/accuracy": float(np.mean([m["accuracy"] for m in fetched])),
           "train/grad_norm": float(fetched[-1]["grad_norm"]),
           "train/lr": lr, "train/skipped": int(skipped)}
    return row, skipped


def log_eval(writer: Writer, step: int, row: dict) -> dict:
    writer.write(step, row)
    if jax.process_index() == 0:
        logging.info("step %d  eval accuracy %.4f  loss %.4f  (%d images)", step,
                     row["eval/accuracy"], row["eval/loss"], row["eval/count"])
    return row


def check_skips(skipped: float, seen: int, data_cfg) -> None:
    if skipped > max(1, data_cfg.max_skipped_fraction * seen):
        raise UserError(f"{int(skipped)} of {seen} training images were unreadable, more than "
                        f"data.max_skipped_fraction={data_cfg.max_skipped_fraction}; fix or "
                        "remove them (the log names each) or raise that key")

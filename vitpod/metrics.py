"""Metrics rows to metrics.jsonl and TensorBoard (process 0 only), and the progress line."""

import json
import os
import time

from absl import logging


class Writer:
    """Appends one JSON object per call to metrics.jsonl and the same scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return round(value, 6) if isinstance(value, float) else value


class Progress:
    """Throughput over the last window and the ETA to the last step."""

    def __init__(self, start_step: int, total_steps: int, global_batch: int):
        self.total, self.batch = total_steps, global_batch
        self.last_step, self.last_time = start_step, time.perf_counter()

    def tick(self, step: int) -> float:
        """Images per second since the previous tick."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return rate

    def line(self, step: int, row: dict) -> None:
        img_per_sec = row["train/img_per_sec"]
        eta = (self.total - step) * self.batch / max(img_per_sec, 1e-9)
        logging.info("step %d/%d  loss %.4f  lr %.2e  %.0f img/s  eta %s", step, self.total,
                     row["train/loss"], row["train/lr"], img_per_sec, _duration(eta))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

"""Goodput: one record per launch of a run, and the sums `report` and DONE show.

Process 0 of every launch writes the launch's record (`protocol.record_path`; one object per
launch: a bucket object cannot be appended to): when it started, on what (hosts, devices,
platform, slice type), the step it resumed from, seconds to restore and to its first step,
the steps it redoes (logged by an earlier launch past the checkpoint it resumed from), its
progress (rewritten at every log row) and how it ended. A launch killed outright cannot write
its end: the next launch marks it `killed` at its last progress. On a pod, `pod-run` writes
its timeline beside it (`protocol.timeline_path`: when it asked for the slice, when it was
ACTIVE and set up), which splits the time between launches into waiting for a slice, setting
it up, and the rest.
"""

import json
import os
import time

from absl import logging

from vitpod import protocol, storage
from vitpod.errors import UserError

_REMEDY = "delete that launch's folder (the goodput report then leaves it out) and relaunch"


def read_records(workdir: str) -> list[dict]:
    """Every launch's record (with pod-run's timeline beside it, if any), oldest first; one
    listing finds them, not an existence check per launch and file."""
    root = protocol.launches_dir(workdir)
    if not storage.isdir(root):
        return []
    present = set(storage.files_below(root))
    records = []
    for rel in sorted(present):
        launch, _, leaf = rel.rpartition("/")
        if leaf != protocol.RECORD or "/" in launch:
            continue
        records.append(storage.read_json(protocol.record_path(workdir, launch), _REMEDY,
                                         protocol.RECORD_SHAPE))
        if f"{launch}/{protocol.POD_TIMELINE}" in present:
            records[-1]["pod"] = storage.read_json(protocol.timeline_path(workdir, launch),
                                                   _REMEDY, protocol.TIMELINE_SHAPE)
    return sorted(records, key=lambda r: r["start_time"])


def _last_logged_step(workdir: str) -> int:
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return 0
    rows, bad = [], 0
    for line in storage.read_text(path).splitlines():
        try:
            rows += [json.loads(line)] if line.strip() else []
        except ValueError:  # a row cut short by a crash: the rows around it still count
            bad += 1
    if bad:
        logging.warning("%s: skipped %d unreadable line(s) (cut short by a crash)", path, bad)
    return max((r["step"] for r in rows if "train/loss" in r and "step" in r), default=0)


class Record:
    """This launch's record; every method is a no-op except on process 0."""

    def __init__(self, workdir: str, enabled: bool, start_time: float):
        self.workdir, self.enabled = workdir, enabled
        launch = protocol.this_launch(start_time, os.getpid())
        self.path = protocol.record_path(workdir, launch)
        self.data = {"launch": launch, "start_time": start_time, "end": None}
        self._saving = 0  # the step whose save began last, maybe not on disk yet

    def _write(self) -> None:
        if self.enabled:
            storage.write_text(self.path, json.dumps(self.data))

    def started(self, start_step: int, restore_seconds: float, hosts: int, devices: int,
                platform: str) -> None:
        if not self.enabled:
            return
        for old in read_records(self.workdir):
            if old["end"] is None and old["launch"] != self.data["launch"]:
                progress = old.get("progress") or {"step": old["start_step"],
                                                   "time": old["start_time"]}
                old["end"] = {"how": "killed", **progress}
                storage.write_text(protocol.record_path(self.workdir, old["launch"]),
                                   json.dumps(old))
        self.data.update(
            hosts=hosts, devices=devices, platform=platform,
            slice=os.environ.get(protocol.SLICE_ENV, ""), start_step=start_step,
            restore_seconds=round(restore_seconds, 3), first_step_seconds=None,
            steps_redone=max(0, _last_logged_step(self.workdir) - start_step), progress=None,
            checkpointed=start_step or None)
        self._write()

    def saving(self, step: int) -> None:
        """A save of `step` began, so the one before it is on disk: orbax waits for it first.
        `checkpointed` (written with the next row) is what a relaunch must find."""
        if self._saving:
            self.data["checkpointed"] = self._saving
        self._saving = step

    def saves_finished(self) -> None:
        """The checkpoint manager waited for every save: the last one is on disk too."""
        if self._saving:
            self.data["checkpointed"] = self._saving

    def first_step(self) -> None:
        self.data["first_step_seconds"] = round(time.time() - self.data["start_time"], 3)
        self._write()

    def progress(self, step: int) -> None:
        self.data["progress"] = {"step": step, "time": time.time()}
        self._write()

    def ended(self, how: str, step: int, error: str = "") -> None:
        self.data["end"] = {"how": how, "step": step, "time": time.time(),
                            **({"error": error} if error else {})}
        self._write()


def check_kept(workdir: str, checkpoints: str, listed: list[int]) -> None:
    """UserError when `checkpoints` lists no checkpoint but the launch records show one was
    saved (the folder deleted or moved): starting again from step 0 would silently redo the
    run, so only --start_over does that."""
    if listed:
        return
    saved = 0
    for r in read_records(workdir):
        saved = max(saved, r.get("checkpointed") or 0, r.get("start_step") or 0)
        if r["end"] and r["end"]["how"] in ("done", "preempted", "stopped"):  # saved at the end
            saved = max(saved, r["end"]["step"])
    if saved:
        raise UserError(
            f"{checkpoints} holds no checkpoint, but the launch records in "
            f"{protocol.launches_dir(workdir)} show this run saved one at step {saved}: it was "
            f"deleted or moved. Put it back to continue from step {saved}, or pass --start_over "
            "to train again from step 0")


def summarize(records: list[dict], price_per_chip_hour: float = 0.0) -> dict:
    """Where the run's wall time and chip time went, from its launch records."""
    out = {"launches": len(records), "wall_seconds": 0.0, "productive_seconds": 0.0,
           "startup_seconds": 0.0, "redone_seconds": 0.0, "between_launches_seconds": 0.0,
           "waiting_for_slice_seconds": 0.0, "setting_up_seconds": 0.0, "chip_hours": 0.0,
           "ended": [r["end"]["how"] if r["end"] else "running" for r in records]}
    previous_end = None
    for r in records:
        end = r["end"] or r.get("progress") or {"step": r.get("start_step", 0),
                                                "time": r["start_time"]}
        duration = max(0.0, end["time"] - r["start_time"])
        startup = min(duration, r.get("first_step_seconds") or duration)
        steps = max(0, end["step"] - r.get("start_step", 0))
        per_step = (duration - startup) / steps if steps else 0.0
        redone = min(duration - startup, r.get("steps_redone", 0) * per_step)
        out["startup_seconds"] += startup
        out["redone_seconds"] += redone
        out["productive_seconds"] += duration - startup - redone
        out["chip_hours"] += duration * r.get("devices", 0) / 3600
        if previous_end is not None:
            gap = max(0.0, r["start_time"] - previous_end)
            out["between_launches_seconds"] += gap
            if r.get("pod"):  # parts of the gap, each clipped to it
                p = r["pod"]
                wait = min(gap, max(0.0, p["active"] - max(p["asked"], previous_end)))
                out["waiting_for_slice_seconds"] += wait
                out["setting_up_seconds"] += min(gap - wait, max(0.0, p["set_up"] - p["active"]))
        previous_end = end["time"]
    if records:
        out["wall_seconds"] = previous_end - records[0]["start_time"]
    out["goodput"] = out["productive_seconds"] / out["wall_seconds"] if out["wall_seconds"] else 0
    if price_per_chip_hour:
        out["cost"] = out["chip_hours"] * price_per_chip_hour
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

"""Where a run's time and chips went: `python -m vitpod.report --workdir=DIR`.

Adds up the workdir's launch records (vitpod/workdir/goodput.py): wall time, the productive
share, the time lost to start-ups, to steps redone after a crash or kill, and between
launches (on a pod split into waiting for a slice, setting it up, and the rest: noticing the
loss, deleting), chip-hours and, with a price, the cost. A finished run has the same figures in
DONE under `goodput`.
"""

import json
import os
import sys

from absl import flags

from vitpod import cli, protocol, storage
from vitpod.errors import UserError
from vitpod.workdir import goodput


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run's workdir (local or gs://).")
    flags.DEFINE_float("price_per_chip_hour", float(os.environ.get("PRICE_PER_CHIP_HOUR") or 0),
                       "Price of one chip-hour, for the cost (default: $PRICE_PER_CHIP_HOUR).")
    flags.DEFINE_enum("format", "text", ["text", "json"], "text for people, json for scripts.")


def _hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def render(workdir: str, records: list[dict], summary: dict, price: float) -> str:
    wall = summary["wall_seconds"] or 1e-9
    lines = [f"run {workdir}: {summary['launches']} launch(es) "
             f"({', '.join(summary['ended'])}), wall time {_hms(summary['wall_seconds'])}"]
    for label, key in (("productive training", "productive_seconds"),
                       ("start-ups (to the first step)", "startup_seconds"),
                       ("steps redone after a crash or kill", "redone_seconds"),
                       ("between launches (capacity, set-up)", "between_launches_seconds")):
        lines.append(f"  {label:<38} {_hms(summary[key]):>10}  {100 * summary[key] / wall:5.1f} %")
    if any(r.get("pod") for r in records[1:]):  # pod-run wrote when it asked and set up
        for label, key in (("of which waiting for a slice", "waiting_for_slice_seconds"),
                           ("of which setting up its workers", "setting_up_seconds")):
            lines.append(f"    {label:<36} {_hms(summary[key]):>10}  "
                         f"{100 * summary[key] / wall:5.1f} %")
    cost = f", cost {summary['cost']:.2f} at {price:g} per chip-hour" if price else ""
    lines.append(f"  goodput {summary['goodput']:.3f}; {summary['chip_hours']:.3f} chip-hours "
                 f"(JAX devices x hours){cost}")
    for r in records:
        end = r["end"] or {"how": "running", **(r.get("progress") or {"step": r["start_step"]})}
        first = r.get("first_step_seconds")
        lines.append(
            f"  launch {r['launch']}: {r.get('slice') or r.get('platform', '?')} "
            f"{r.get('hosts', '?')} host(s) x {r.get('devices', 0) // max(r.get('hosts', 1), 1)}"
            f" devices, steps {r['start_step']}->{end['step']}, restore "
            f"{r.get('restore_seconds', 0):.1f} s, first step after "
            f"{'-' if first is None else f'{first:.1f} s'}, {r.get('steps_redone', 0)} redone, "
            f"{end['how']}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not flags.FLAGS.workdir:
        raise UserError("pass --workdir=DIR (the run's workdir)")
    if not storage.isdir(flags.FLAGS.workdir):
        raise UserError(f"--workdir={flags.FLAGS.workdir} does not exist or is not a directory")
    records = goodput.read_records(flags.FLAGS.workdir)
    if not records:
        where = protocol.launches_dir(flags.FLAGS.workdir)
        raise UserError(f"no launch records in {where}: is it a vitpod workdir (runs before "
                        "goodput records have none)?")
    price = flags.FLAGS.price_per_chip_hour
    summary = goodput.summarize(records, price)
    if flags.FLAGS.format == "json":
        print(json.dumps({"summary": summary, "launches": records}))
    else:
        print(render(flags.FLAGS.workdir, records, summary, price))
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    cli.run(main)

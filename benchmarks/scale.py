"""Which big ViTs fit which TPU slices, from `plan` (compiled here for each topology).

    python benchmarks/scale.py [--variants=B/16,L/16,H/14] [--per_chip_batch=32] \
        [--topologies=v4:2x2x1,v4:2x2x4,v5e:4x4,v5:2x2x1] [--num_slices=1] \
        [--out=benchmarks/scale.md] [--multislice_out=benchmarks/scale_multislice.md] \
        [--rows_from=LOG,...]

For each variant at 224 px (the `vit_b16_i1k` recipe: bfloat16 matmuls, AdamW), FSDP over
every chip of a slice (params and optimizer state sharded, one layer gathered at a time)
and `per_chip_batch` images per chip: whether the train step fits in HBM as it is, else the
remedy `plan` found by compiling (full remat, gradient accumulation), HBM per chip, and
the img/s per chip implied at 50 % MFU. Compiled, not run: no speed is measured.
With `--num_slices=2,4` each topology is also compiled as that many slices joined by DCN
(the data axis over the slices, `mesh.dcn_data=-1`), and those rows go to `multislice_out`
with `plan`'s DCN figures: MB each chip sends per step, the Gb/s per chip that takes at 40
and 60 % MFU, its verdict, and the minutes the row took to compile.
Prints one JSON line per row and writes markdown tables.
"""

import datetime
import importlib.metadata
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

flags.DEFINE_list("variants", ["B/16", "L/16", "H/14"], "Model variants.")
flags.DEFINE_list("topologies", ["v4:2x2x1", "v4:2x2x4", "v5e:4x4", "v5:2x2x1"],
                  "TPU topologies (v4:2x2x1 is a v4-8, v4:2x2x4 a v4-32, v5e:4x4 a v5e-16, "
                  "v5:2x2x1 a v5p-8, v6e:4x4 a v6e-16).")
flags.DEFINE_list("num_slices", ["1"], "Numbers of slices of each topology (>1: multislice).")
flags.DEFINE_list("rows_from", [], "Logs of earlier runs (their JSON lines): tabulate those "
                  "rows instead of compiling.")
flags.DEFINE_integer("per_chip_batch", 32, "Images per chip per step.")
flags.DEFINE_string("out", "benchmarks/scale.md", "Markdown table of the one-slice rows.")
flags.DEFINE_string("multislice_out", "benchmarks/scale_multislice.md",
                    "Markdown table of the multislice rows.")
FLAGS = flags.FLAGS
SLICE_NAMES = {"v4:2x2x1": "v4-8", "v4:2x2x4": "v4-32", "v5e:4x4": "v5e-16", "v5:2x2x1": "v5p-8",
               "v6e:4x4": "v6e-16"}
DCN_KEYS = ("dcn_bytes_per_step_per_chip", "dcn_gbps_per_chip_at_40pct_mfu",
            "dcn_gbps_per_chip_at_60pct_mfu", "dcn_verdict")


def row(variant: str, topology: str, num_slices: int) -> dict:
    from tests.conftest import load_config
    from vitpod import plan
    from vitpod.planning.compile import CHIPS, tpu_devices

    chips = len(tpu_devices(topology)) * num_slices
    config = load_config("vit_b16_i1k", model__variant=variant,
                         batch_size=FLAGS.per_chip_batch * chips, mesh__data=1,
                         mesh__fsdp=-1, mesh__dcn_data=-1)
    start = time.monotonic()
    result = plan.plan(config, topology, 1000, input_budget=False, num_slices=num_slices)
    best = result.get("with_remedy", result)  # the remedy's figures when one was needed
    if num_slices > 1 and "dcn_bytes_per_step_per_chip" not in best:
        # plan's `with_remedy` keeps only the remedy's verdict of the DCN figures: plan the
        # remedied config again, as a user would with the flags it names.
        remedied = config.copy_and_resolve_references()
        remedied.update_from_flattened_dict({
            k.removeprefix("--config."): _value(v) for k, v in (
                flag.split("=", 1) for flag in result["fits_with"].split())})
        again = plan.plan(remedied, topology, 1000, input_budget=False, num_slices=num_slices)
        best = {**best, **{k: again[k] for k in DCN_KEYS if k in again}}
    seconds = time.monotonic() - start
    peak = CHIPS[topology.split(":")[0]][0]
    name = SLICE_NAMES.get(topology, topology)
    out = {"variant": variant, "slice": name if num_slices == 1 else f"{num_slices} x {name}",
           "topology": topology, "num_slices": num_slices, "chips": chips,
           "batch_size": config.batch_size, "fits": result["fits"],
           "remedy": result.get("fits_with", ""), "hbm_per_chip_gib": best.get("total_gib"),
           "verdict": result["verdict"], "compile_minutes": round(seconds / 60, 1),
           **{k: best[k] for k in DCN_KEYS if k in best}}
    if "tflops_per_step_per_chip" in best:
        step = best["tflops_per_step_per_chip"] * 1e12 / (0.5 * peak)
        out["img_per_sec_per_chip_at_50pct_mfu"] = round(FLAGS.per_chip_batch / step)
    return out


def _value(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def _remedy(r: dict) -> str:
    return r["remedy"] or ("-" if r["fits"] else "none: " + r["verdict"][:80])


def single_table(rows: list) -> list:
    lines = [f"ViT at 224 px, bfloat16 matmuls, FSDP over all chips, {FLAGS.per_chip_batch} "
             "images per chip (`python benchmarks/scale.py`):", "",
             "| model | slice | fits as is | remedy found by `plan` | HBM per chip (GiB) | "
             "img/s per chip at 50 % MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| ViT-{r['variant']} | {r['slice']} | {'yes' if r['fits'] else 'no'} | "
                     f"{_remedy(r)} | {r['hbm_per_chip_gib'] or '-'} | "
                     f"{r.get('img_per_sec_per_chip_at_50pct_mfu', '-')} |")
    return lines


def multi_table(rows: list) -> list:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("jax", "libtpu"))
    lines = [
        "# Several slices: what crossing them asks of the DCN", "",
        f"ViT at 224 px, bfloat16 matmuls, {FLAGS.per_chip_batch} images per chip, FSDP over the "
        "chips of each slice and the data axis over the slices (`mesh.data=1 mesh.fsdp=-1 "
        "mesh.dcn_data=-1`; `python benchmarks/scale.py --num_slices=...`). Compiled, not run: "
        f"`plan --num_slices` compiled each train step for the slices ahead of time ({versions}) "
        f"on a {os.cpu_count()}-core CPU-only VM, {datetime.datetime.now(datetime.UTC):%Y-%m-%d};"
        " the last column is the minutes each row took. DCN MB are what each chip sends per step"
        " (read from the compiled program), Gb/s what that takes when the transfer lasts as long"
        " as the step's compute. Where `plan` needed a remedy, the HBM and DCN figures are the "
        "remedied config's. `v5e-16` is gcloud's `v5litepod-16`. How to read it: "
        "[docs/planning.md](../docs/planning.md#which-big-vits-fit-which-slices).", "",
        "| model | slices | chips | fits as is | remedy found by `plan` | HBM per chip (GiB) | "
        "DCN MB per chip per step | DCN Gb/s per chip at 40 / 60 % MFU | DCN verdict | "
        "compile (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = r.get("dcn_bytes_per_step_per_chip")
        gbps = (f"{r['dcn_gbps_per_chip_at_40pct_mfu']} / {r['dcn_gbps_per_chip_at_60pct_mfu']}"
                if "dcn_gbps_per_chip_at_60pct_mfu" in r else "-")
        lines.append(f"| ViT-{r['variant']} | {r['slice']} | {r['chips']} | "
                     f"{'yes' if r['fits'] else 'no'} | {_remedy(r)} | "
                     f"{r['hbm_per_chip_gib'] or '-'} | "
                     f"{'-' if mb is None else f'{mb / 1e6:.1f}'} | {gbps} | "
                     f"{r.get('dcn_verdict', '-')} | {r['compile_minutes']} |")
    return lines


def main(argv) -> None:
    del argv
    rows = [json.loads(line) for path in FLAGS.rows_from for line in open(path)
            if line.startswith("{")]
    for variant in FLAGS.variants if not rows else []:
        for topology in FLAGS.topologies:
            for num_slices in map(int, FLAGS.num_slices):
                rows.append(row(variant, topology, num_slices))
                print(json.dumps(rows[-1]), flush=True)
    single = [r for r in rows if r["num_slices"] == 1]
    multi = [r for r in rows if r["num_slices"] > 1]
    for path, lines in ((FLAGS.out, single and single_table(single)),
                        (FLAGS.multislice_out, multi and multi_table(multi))):
        if lines:
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            print("\n".join(lines))

if __name__ == "__main__":
    app.run(main)

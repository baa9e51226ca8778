"""Which big ViTs fit which TPU slices, from `plan` (compiled here for each topology).

    python benchmarks/scale.py [--variants=B/16,L/16,H/14] [--per_chip_batch=32] \
        [--topologies=v4:2x2x1,v4:2x2x4,v5e:4x4,v5:2x2x1] [--out=benchmarks/scale.md]

For each variant at 224 px (the `vit_b16_i1k` recipe: bfloat16 matmuls, AdamW), FSDP over
every chip of the slice (params and optimizer state sharded, one layer gathered at a time)
and `per_chip_batch` images per chip: whether the train step fits in HBM as it is, else the
remedy `plan` found by compiling (full remat, gradient accumulation), HBM per chip, and
the img/s per chip implied at 50 % MFU. Compiled, not run: no speed is measured.
Prints one JSON line per row and writes a markdown table.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

flags.DEFINE_list("variants", ["B/16", "L/16", "H/14"], "Model variants.")
flags.DEFINE_list("topologies", ["v4:2x2x1", "v4:2x2x4", "v5e:4x4", "v5:2x2x1"],
                  "TPU topologies (v4:2x2x1 is a v4-8, v4:2x2x4 a v4-32, v5e:4x4 a v5e-16, "
                  "v5:2x2x1 a v5p-8).")
flags.DEFINE_integer("per_chip_batch", 32, "Images per chip per step.")
flags.DEFINE_string("out", "benchmarks/scale.md", "Markdown table to write.")
FLAGS = flags.FLAGS
SLICE_NAMES = {"v4:2x2x1": "v4-8", "v4:2x2x4": "v4-32", "v5e:4x4": "v5e-16", "v5:2x2x1": "v5p-8"}


def row(variant: str, topology: str) -> dict:
    from tests.conftest import load_config
    from vitpod import plan
    from vitpod.planning.compile import CHIPS, tpu_devices

    chips = len(tpu_devices(topology))
    config = load_config("vit_b16_i1k", model__variant=variant,
                         batch_size=FLAGS.per_chip_batch * chips, mesh__data=1,
                         mesh__fsdp=-1)
    result = plan.plan(config, topology, 1000)
    peak = CHIPS[topology.split(":")[0]][0]
    best = result.get("with_remedy", result)  # the remedy's figures when one was needed
    out = {"variant": variant, "slice": SLICE_NAMES.get(topology, topology),
           "topology": topology, "chips": chips, "batch_size": config.batch_size,
           "fits": result["fits"], "remedy": result.get("fits_with", ""),
           "hbm_per_chip_gib": best.get("total_gib"), "verdict": result["verdict"]}
    if "tflops_per_step_per_chip" in best:
        seconds = best["tflops_per_step_per_chip"] * 1e12 / (0.5 * peak)
        out["img_per_sec_per_chip_at_50pct_mfu"] = round(FLAGS.per_chip_batch / seconds)
    return out


def main(argv) -> None:
    del argv
    rows = []
    for variant in FLAGS.variants:
        for topology in FLAGS.topologies:
            rows.append(row(variant, topology))
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"ViT at 224 px, bfloat16 matmuls, FSDP over all chips, {FLAGS.per_chip_batch} "
             "images per chip (`python benchmarks/scale.py`):", "",
             "| model | slice | fits as is | remedy found by `plan` | HBM per chip (GiB) | "
             "img/s per chip at 50 % MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        remedy = r["remedy"] or ("-" if r["fits"] else "none: " + r["verdict"][:80])
        lines.append(f"| ViT-{r['variant']} | {r['slice']} | {'yes' if r['fits'] else 'no'} | "
                     f"{remedy} | {r['hbm_per_chip_gib'] or '-'} | "
                     f"{r.get('img_per_sec_per_chip_at_50pct_mfu', '-')} |")
    with open(FLAGS.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

"""Will a config fit a TPU slice, and how fast should it go? Compiled here, on CPU.

    python -m vitpod.plan --config=configs/vit_b16_ft.py --topology=v4:2x2x4 \
        [--num_slices=1] [--num_classes=1000] [--config.KEY=VALUE ...]

With the `tpu` extra installed (libtpu), compiles the real train step ahead of time for the
topology (`gen:AxB[xC]`: `v4:2x2x4` is a v4-32, `v5e:2x4` a v5e-8, `v5:2x2x1` a v5p-8,
`v6e:2x2` a v6e-4) and prints per-chip HBM (params, optimizer state, temporaries), FLOPs per
step, the step time and img/s per chip implied at 40 % and 60 % MFU, XLA's cost-model
prediction of the step time (with the img/s and MFU it implies, the bytes it moves and its
temporaries: an estimate, memory-bound, collectives priced as HBM traffic, not a
measurement; vitpod/planning/cost.py), the collective bytes per step, and whether it fits
(after the start-up a launch runs: the mesh and each host's rows of the batch, `host_rows`,
in libtpu's order of the chips); if not, the first of FSDP over all chips, full remat and
gradient accumulation (in that order, compiled to check) that makes it fit
(vitpod/planning/compile.py compiles, vitpod/planning/fit.py searches). Then what each host
must feed the chips (vitpod/planning/input_budget.py): img/s, decode cores, bucket reads/s.
With `--num_slices=N` it compiles for N such slices (multislice, the data axis over DCN) and
also prints the bytes each chip sends over DCN per step, the bandwidth that takes at 40 % and
60 % MFU, and whether the documented per-chip figure carries it.
"""

import json
import os

from absl import flags

from vitpod import cli
from vitpod.errors import UserError
from vitpod.planning import fit, startup
from vitpod.planning.compile import tpu_devices


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:2x2x4 (a v4-32) or v5e:2x4.")
    flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multislice over DCN).")
    flags.DEFINE_integer("num_classes", 1000, "Classes of the dataset (the head's size).")
    flags.DEFINE_enum("format", "text", ["text", "json"], "json: one object.")


def plan(config, topology: str, num_classes: int, input_budget: bool = True,
         num_slices: int = 1) -> dict:
    """The plan for `config` on `num_slices` slices of `topology`, with what its hosts must
    feed it (`input`). When it does not fit, also the first remedy that does, found by
    compiling."""
    config, model_line = _architecture(config)
    launch = config.copy_and_resolve_references()
    launch.data.train_dir = launch.data.train_dir or "(not read by plan)"
    start = startup.check(launch, tpu_devices(topology, num_slices), num_classes)
    result = {"model": model_line, **fit.search(config, topology, num_classes, num_slices),
              "host_rows": startup.rows_json(start.host_rows)}
    rates = result.get("with_remedy", result)
    if input_budget and rates.get("img_per_sec_per_chip_at_60pct_mfu"):
        from vitpod.planning import input_budget as budget_lib

        hosts = len({d.process_index for d in tpu_devices(topology, num_slices)})
        ms, where = budget_lib.cpu_ms_per_image(config.data)
        result["input"] = budget_lib.budget({**rates, "chips": result["chips"]}, hosts,
                                            topology.split(":")[0], ms, where,
                                            budget_lib.reads_per_image(config.data),
                                            config.data, config.batch_size)
    return result


def _architecture(config):
    """(config, what is planned): a run with `model.init_from` trains the checkpoint's
    architecture whatever `model.variant` says (train.py adopts it), so the plan does too;
    when the checkpoint cannot be read here (a hub id offline), model.variant, said so."""
    from vitpod.formats import detect

    if not config.model.init_from:
        return config, config.model.variant
    try:
        ckpt = detect.read(config.model.init_from)
    except UserError as e:
        return config, (f"{config.model.variant} (model.variant: model.init_from cannot be "
                        f"read here: {e})")
    config = config.copy_and_resolve_references()
    detect.adopt(config.model, ckpt)
    return config, f"{config.model.variant} (from model.init_from={config.model.init_from})"


def main(argv) -> None:
    f = flags.FLAGS
    if not f.topology:
        raise UserError("pass --topology=GEN:AxB[xC], e.g. v4:2x2x4 (a v4-32)")
    result = plan(cli.config(f.config), f.topology, f.num_classes, num_slices=f.num_slices)
    if f.format == "json":
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key == "host_rows":
            for host, runs in list(value.items())[:4]:
                text = ",".join(f"{a}-{b - 1}" for a, b in runs)
                print(f"{'host ' + host + ' rows':36s} {text}")
            if len(value) > 4:
                print(f"{'(hosts)':36s} {len(value)}: see --format=json for the rest")
        elif key == "input":
            for k, v in value.items():
                print(f"{'input.' + k:36s} {v}")
        else:
            print(f"{key:36s} {value}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, run nothing
    define_flags()
    cli.run(main)

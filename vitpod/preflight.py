"""Will a config run on each of these slices? Checked before any of them is paid for.

    python -m vitpod.preflight --config=configs/X.py \
        --slices=v4-32=16@v4:2x2x4,2xv4-16=16/2@v4:2x2x2 [--config.KEY=VALUE ...]

`pod-run` and `gke-run` run it with the local venv for every type in TPU_TYPES (times every
count in NUM_SLICES: `/2` is two slices of it, the data axis over both) before creating a
slice: the global batch, the mesh and gradient accumulation must fit each type's device
count, or a fallback slice would be created, set up and billed only to fail at its first step.
With a type's libtpu topology (`@v4:2x2x4`) and libtpu installed, it runs the launch's own
start-up on libtpu's description of the chips (vitpod/planning/startup.py): the mesh in the
chips' real order, every host's rows of the batch, the state's shardings. Prints a line per
slice (the rows each device gets: a smaller fallback gives each chip more, which `plan`
checks against HBM); exit 2 naming every slice the config does not fit.
"""

import sys

from absl import flags

from vitpod import cli
from vitpod import config as config_lib
from vitpod.errors import UserError


def define_flags() -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("slices", None, "NAME=DEVICES[/SLICES],...: each slice type (or "
                        "multislice job) and its JAX device count, e.g. v4-32=16,2xv4-16=16/2.")


def parse_slices(text: str) -> list[tuple[str, int, int, str]]:
    """NAME=DEVICES[/SLICES][@TOPOLOGY],...: (name, devices of the whole job, slices, libtpu
    topology or "")."""
    out = []
    for item in (text or "").split(","):
        name, _, count = item.strip().rpartition("=")
        count, _, topology = count.partition("@")
        devices, _, slices = count.partition("/")
        if not name or not devices.isdigit() or int(devices) < 1 or not (
                slices == "" or slices.isdigit() and int(slices) >= 1):
            raise UserError(f"--slices={text!r}: write NAME=DEVICES[/SLICES][@TOPOLOGY],... "
                            "(e.g. v4-32=16@v4:2x2x4,2xv4-16=16/2@v4:2x2x2)")
        out.append((name, int(devices), int(slices or 1), topology))
    return out


def check(config, slices: list[tuple[str, int, int, str]]) -> tuple[list[str], list[str]]:
    """(a line per slice that fits, a line per slice that does not)."""
    fits, fails = [], []
    for name, devices, num_slices, topology in slices:
        try:
            config_lib.validate(config, devices, 1, num_slices)
            data, fsdp = config_lib.mesh_shape(config.mesh, devices, num_slices)
            order = _start_up(config, devices, num_slices, topology)
        except UserError as e:
            fails.append(f"{name} ({devices} devices): {e}")
            continue
        fits.append(f"{name}: ok on {devices} devices (mesh data={data} x fsdp={fsdp}), "
                    f"{config.batch_size // devices} rows per device per step; {order}")
    return fits, fails


def _start_up(config, devices: int, num_slices: int, topology: str) -> str:
    """The launch's start-up on libtpu's description of the type; what it found, in words."""
    if not topology:
        return "device order not checked (no libtpu topology known for this type)"
    try:
        from vitpod.planning import compile as compile_lib
        chips = compile_lib.tpu_devices(topology, num_slices)
    except UserError as e:
        return f"device order not checked ({e})"
    except Exception as e:  # noqa: BLE001  libtpu cannot describe it: say so, go on
        return f"device order not checked (libtpu: {str(e).splitlines()[0][:120]})"
    if len(chips) != devices:
        raise UserError(f"libtpu's {topology} x {num_slices} has {len(chips)} devices, not "
                        f"{devices}")
    from vitpod import mesh as mesh_lib
    from vitpod.planning import startup

    start = startup.check(config, chips, num_classes=1000)
    return (f"started on libtpu's {topology}" + (f" x {num_slices}" if num_slices > 1 else "")
            + f": {start.hosts} hosts, host 0 holds rows "
            + mesh_lib.runs_text(start.host_rows[0]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}")
    config = cli.config(flags.FLAGS.config)
    fits, fails = check(config, parse_slices(flags.FLAGS.slices))
    for line in fits:
        print(line)
    sys.stdout.flush()
    if fails:
        raise UserError("the config does not fit " + "; ".join(fails))


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Will a config run on each of these slices? Checked before any of them is paid for.

    python -m vitpod.preflight --config=configs/X.py --slices=v4-32=16,2xv4-16=16/2 \
        [--config.KEY=VALUE ...]

`pod-run` runs it with the local venv for every type in TPU_TYPES (times every count in
NUM_SLICES: `/2` is two slices of it, the data axis over both) before creating a slice:
the global batch, the mesh and gradient accumulation must fit each type's device count, or a
fallback slice would be created, set up and billed only to fail at its first step. Prints a
line per slice (the rows each device gets: a smaller fallback gives each chip more, which
`plan` checks against HBM); exit 2 naming every slice the config does not fit.
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


def parse_slices(text: str) -> list[tuple[str, int, int]]:
    """NAME=DEVICES[/SLICES],...: (name, devices of the whole job, slices)."""
    out = []
    for item in (text or "").split(","):
        name, _, count = item.strip().rpartition("=")
        devices, _, slices = count.partition("/")
        if not name or not devices.isdigit() or int(devices) < 1 or not (
                slices == "" or slices.isdigit() and int(slices) >= 1):
            raise UserError(f"--slices={text!r}: write NAME=DEVICES[/SLICES],... (e.g. "
                            "v4-32=16,2xv4-16=16/2)")
        out.append((name, int(devices), int(slices or 1)))
    return out


def check(config, slices: list[tuple[str, int, int]]) -> tuple[list[str], list[str]]:
    """(a line per slice that fits, a line per slice that does not)."""
    fits, fails = [], []
    for name, devices, num_slices in slices:
        try:  # hosts divide devices: no further rule
            config_lib.validate(config, devices, 1, num_slices)
        except UserError as e:
            fails.append(f"{name} ({devices} devices): {e}")
            continue
        data, fsdp = config_lib.mesh_shape(config.mesh, devices, num_slices)
        fits.append(f"{name}: ok on {devices} devices (mesh data={data} x fsdp={fsdp}), "
                    f"{config.batch_size // devices} rows per device per step")
    return fits, fails


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

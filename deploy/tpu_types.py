"""What a TPU type is as a GKE node pool: the node labels a pod selects it by, the machine type
its node pool is created with, chips per VM and VMs per slice.

The values are those of AI-Hypercomputer/xpk (`src/xpk/core/system_characteristics.py`), which
creates GKE TPU node pools and JobSets for them: a type's number counts TensorCores (v4, v5p: 2
per chip) or chips (v5litepod, v6e); a slice of more than one chip has 4 chips per VM. Only the
topologies listed here are accepted: for v4 and v5p they are xpk's defaults for each size.
TPU7x is refused: its node pools take a workload policy instead of a topology and xpk runs two
containers per VM there, neither verified here (docs/gke.md).
"""

import dataclasses
import math

from deploy.shell import DeployError

ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
TPU_RESOURCE = "google.com/tpu"  # the device plugin's resource; also the TPU nodes' taint key

# Per generation: (GKE accelerator label value, TensorCores per chip, machine type of its
# 4-chip VMs, of its 1-chip VM or "" when a 1-chip slice is not offered, topologies).
_V4 = "2x2x1 2x2x2 2x2x4 2x4x4 4x4x4 4x4x8 4x8x8 8x8x8 8x8x12 8x8x16 8x16x16"
_V5P = """2x2x1 2x2x2 2x2x4 2x4x4 4x4x4 4x4x8 4x4x12 4x8x8 4x4x20 4x8x12 4x4x28 8x8x8 4x12x12
    4x8x20 4x4x44 8x8x12 4x4x52 4x8x28 4x12x20 8x8x16 4x4x68 8x12x12 4x4x76 8x8x20 4x12x28
    4x8x44 4x4x92 8x12x16 4x20x20 4x8x52 12x12x12 8x8x28 4x4x116 8x12x20 4x4x124 8x16x16
    4x12x44 4x8x68 4x20x28 12x12x16 4x4x148 4x8x76 4x12x52 8x16x20 4x4x164 8x12x28 4x4x172
    8x8x44 12x12x20 4x8x92 4x4x188 12x16x16 4x28x28 8x20x20 4x12x68 8x8x52 4x4x212 12x12x24
    4x20x44 8x16x28 4x12x76 4x8x116 4x4x236 12x16x20 4x4x244 4x8x124 12x12x28 16x16x16
    4x20x52 8x12x44 8x8x68 4x12x92 8x20x28 12x16x24 4x8x148 12x20x20 8x8x76 4x28x44 8x12x52
    16x16x20 12x12x36 4x8x164 12x16x28 4x20x68 4x8x172 4x12x116 8x16x44 12x20x24 4x28x52
    8x8x92 4x12x124 4x8x188 4x20x76 16x16x24 12x24x24 16x20x28"""
GENERATIONS = {
    "v4": ("tpu-v4-podslice", 2, "ct4p-hightpu-4t", "", _V4),
    "v5p": ("tpu-v5p-slice", 2, "ct5p-hightpu-4t", "", _V5P),
    "v5litepod": ("tpu-v5-lite-podslice", 1, "ct5lp-hightpu-4t", "", "2x4 4x4 4x8 8x8 8x16 16x16"),
    "v6e": ("tpu-v6e-slice", 1, "ct6e-standard-4t", "ct6e-standard-1t",
            "1x1 2x2 2x4 4x4 4x8 8x8 8x16 16x16"),
}
REFUSED = {"tpu7x": "TPU7x node pools take a workload policy (placement policy) instead of a "
                    "topology and xpk runs two containers per VM there; neither is verified here"}


@dataclasses.dataclass(frozen=True)
class GkeTpu:
    """One TPU type on GKE."""

    name: str  # v5litepod-16
    accelerator: str  # the cloud.google.com/gke-tpu-accelerator label: tpu-v5-lite-podslice
    topology: str  # the cloud.google.com/gke-tpu-topology label: 4x4
    machine_type: str  # its node pool's: ct5lp-hightpu-4t
    chips_per_vm: int
    vms_per_slice: int

    @property
    def chips(self) -> int:
        return self.chips_per_vm * self.vms_per_slice


def _tpu(generation: str, topology: str) -> GkeTpu:
    accelerator, cores, machine, machine_1t, _ = GENERATIONS[generation]
    chips = math.prod(int(n) for n in topology.split("x"))
    per_vm = 1 if chips == 1 else 4
    return GkeTpu(f"{generation}-{chips * cores}", accelerator, topology,
                  machine_1t if chips == 1 else machine, per_vm, chips // per_vm)


def known_types() -> dict[str, GkeTpu]:
    """Every accepted type by name."""
    return {t.name: t for g, spec in GENERATIONS.items() for t in
            (_tpu(g, topology) for topology in spec[4].split())}


def gke_tpu(tpu_type: str) -> GkeTpu:
    """The GKE values of a type; a DeployError naming the accepted sizes otherwise."""
    known = known_types()
    if tpu_type in known:
        return known[tpu_type]
    generation = tpu_type.rsplit("-", 1)[0]
    if generation in REFUSED:
        raise DeployError(f"TPU_TYPE={tpu_type!r}: not supported on GKE by vitpod yet: "
                          f"{REFUSED[generation]} (docs/gke.md)")
    sizes = [t.name for t in known.values() if t.name.rsplit("-", 1)[0] == generation]
    if sizes:
        shown = ", ".join(sizes[:12]) + (", ..." if len(sizes) > 12 else "")
        raise DeployError(f"TPU_TYPE={tpu_type!r}: no GKE slice of that size; use one of {shown}")
    raise DeployError(f"TPU_TYPE={tpu_type!r}: not a TPU type vitpod knows on GKE; use "
                      f"{', '.join(g + '-N' for g in GENERATIONS)} (e.g. v5litepod-16)")


# libtpu's names of the generations (jax.experimental.topologies.get_topology_desc).
LIBTPU_GENERATIONS = {"v4": "v4", "v5p": "v5", "v5litepod": "v5e", "v6e": "v6e"}


def libtpu_topology(tpu_type: str) -> str:
    """The type's topology as libtpu names it (v4-32 -> v4:2x2x4, v5litepod-16 -> v5e:4x4), for
    checking a launch's start-up on the chips' real order; "" for a type not in the table.
    Cloud TPU VMs of these sizes get the same default topologies as GKE's node pools."""
    tpu = known_types().get(tpu_type)
    if tpu is None:
        return ""
    return f"{LIBTPU_GENERATIONS[tpu.name.rsplit('-', 1)[0]]}:{tpu.topology}"

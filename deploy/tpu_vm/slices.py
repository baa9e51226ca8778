"""What the TPU-VM run loop needs of a slice and of its workers.

One queued resource (queued_resource.QueuedResource) with its TPU VMs
(workers.TpuVmWorkers, or MultisliceWorkers for several nodes) is the kind there is; the run
loop, the launch and the set-up use only these methods. GKE is not a kind of slice: the
cluster restarts a JobSet itself, so deploy/gke watches it instead (deploy/gke/run.py).
"""

import dataclasses
from collections.abc import Callable
from typing import Protocol

# What one call on a worker returns: (exit code, stdout, stderr).
Result = tuple[int, str, str]


@dataclasses.dataclass(frozen=True)
class Health:
    """A slice at one look: up (its trainers can be watched), lost (why), or neither (waiting
    through `note`, e.g. a preemption notice)."""

    up: bool = False
    lost: str = ""
    note: str = ""


class Workers(Protocol):
    """The hosts of a slice, by index 0..count-1."""

    count: int

    def run(self, i: int, command: str, stream: bool = True,
            retries: int | None = None) -> Result:
        """Run a shell command on worker i (from its home), printing its output as `[wI] `."""
        ...

    def copy(self, i: int, target: str, *sources: str) -> Result:
        """Copy local files to `target` on worker i (`~/` or a folder below it)."""
        ...

    def on_each(self, what: str, call: Callable[[int], Result]) -> dict[int, object]:
        """call(i) on every worker in parallel; a DeployError naming each worker that failed."""
        ...

    def each(self, call: Callable[[int], object]) -> dict[int, object]:
        """call(i) on every worker in parallel: {i: its result or the exception it raised}."""
        ...

    def shell(self, worker: str) -> None:
        """An interactive shell on a worker (`all` where the kind allows it)."""
        ...

    def coordinator(self) -> tuple[str, str, str]:
        """Where JAX's coordinator listens, worker 0 (of the first slice): its internal IP, its
        network and the network's range ('' for what the cloud does not say)."""
        ...


class Slice(Protocol):
    """A set of accelerator hosts that is asked for, may be taken back, and is deleted."""

    name: str

    def create(self) -> bool:
        """Wait until the slice is up, asking for it as needed; True when it is new (bare)."""
        ...

    def delete(self) -> None:
        """Delete it and wait until its name is free again."""
        ...

    def state(self) -> tuple[str, str]:
        """(state, failure message), as the cloud names them; ('NOT_FOUND', '') when absent."""
        ...

    def health(self) -> Health:
        ...

    def workers(self, reachable_only: bool = False) -> Workers:
        """Its workers, counted from the cloud's answer (never from a table), slice after
        slice; with `reachable_only`, those of the slices not lost."""
        ...

    def accelerator_type(self) -> str:
        """The type of each slice (once `workers()` has read it), else the type asked for."""
        ...

    def slice_count(self) -> int:
        """How many slices of that type form the job (multislice over DCN when above 1)."""
        ...

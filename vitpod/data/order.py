"""The order examples are read in, as pure functions of (number of examples, seed, epoch).

`data.shuffle="global"`: grain's seeded permutation of the whole split each epoch (one read
per image wherever the images are).

`data.shuffle="blocks"`: reads that a bucket serves in few requests. The split's *pack
order* (a fixed permutation of its sorted listing: the order `prepare pack` writes records
in) is rotated by a seeded offset each epoch and cut into *runs* of `data.shuffle_block`
consecutive positions and *windows* of `data.shuffle_window` runs. The windows are shuffled,
then the runs inside each window (the last run, maybe short, stays last, so runs stay
aligned). A run is one ranged read of a packed shard; a host's contiguous rows of a batch
are whole runs for any host count whose per-host batch is a multiple of the run; and only
the few shards under the current window are open. An ImageFolder has the same pack order,
so packed data and the ImageFolder it came from train on the same batches.

The price: a batch draws from one or two windows, not the whole split (windows of 1,024
runs of 32 are 32k images: several batches each), and an image meets the other images of
its run again, shifted by the epoch's offset. The global shuffle stays the default.
"""

import dataclasses
import functools

import numpy as np

PACK_SEED = 0  # the pack order is part of the packed format: never change it


@functools.lru_cache(maxsize=4)
def pack_order(n: int) -> np.ndarray:
    """Position p of the pack order holds the split's example pack_order(n)[p]."""
    return np.random.default_rng(PACK_SEED).permutation(n)


@functools.lru_cache(maxsize=4)
def pack_position(n: int) -> np.ndarray:
    """The inverse: example i sits at position pack_position(n)[i]."""
    inverse = np.empty(n, np.int64)
    inverse[pack_order(n)] = np.arange(n)
    return inverse


def _last_stays_last(count: int, rng: np.random.Generator) -> list[int]:
    """A seeded order of range(count) that keeps count-1 last (a possibly short last group)."""
    return [*rng.permutation(count - 1), count - 1]


def block_epoch(n: int, seed: int, epoch: int, block: int, window: int) -> np.ndarray:
    """Example indices of one epoch in the blocks order (a permutation of range(n))."""
    rng = np.random.default_rng([seed, epoch])
    positions = (int(rng.integers(block)) + np.arange(n)) % n  # may wrap: still n distinct
    runs = np.array_split(positions, range(block, n, block))
    windows = [runs[i:i + window] for i in range(0, len(runs), window)]
    out = []
    for w in _last_stays_last(len(windows), rng):
        in_window = windows[w]
        order = (_last_stays_last(len(in_window), rng) if w == len(windows) - 1
                 else rng.permutation(len(in_window)))
        out += [in_window[i] for i in order]
    return pack_order(n)[np.concatenate(out)]


@dataclasses.dataclass(frozen=True)
class BlockOrder:
    """Position in the repeated split -> example index, for `MapDataset.map`."""

    n: int
    seed: int
    block: int
    window: int

    def __call__(self, position: int) -> int:
        epoch, i = divmod(int(position), self.n)
        return int(_cached_epoch(self.n, self.seed, epoch, self.block, self.window)[i])


@functools.lru_cache(maxsize=2)  # per process: the epoch being read and the next
def _cached_epoch(n: int, seed: int, epoch: int, block: int, window: int) -> np.ndarray:
    return block_epoch(n, seed, epoch, block, window)

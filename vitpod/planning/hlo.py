"""Reading a compiled XLA program's HLO text: the bytes each kind of collective sends per step
(`plan`, and the parallel tests that check a layout's communication)."""

import math
import re

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
               "f64": 8, "s64": 8}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per step, from compiled HLO text; a loop's
    body counts once per trip (XLA's known_trip_count), so a scan over layers counts L times.
    Collectives within groups of one device (a mesh axis of size 1) send nothing."""
    def measure(line: str) -> tuple[str, int] | None:
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(",
                     line)
        if not m or re.search(r"replica_groups=\{(\{\d+\},?)+\}", line):  # groups of 1: no-ops
            return None
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))
        if m.group(3):  # async start: (operands, results); count the results half
            shapes = shapes[len(shapes) // 2:]
        return m.group(2), sum(_bytes(t, dims) for t, dims in shapes)
    totals = _per_step(hlo_text, measure)
    return {k: totals[k] for k in COLLECTIVES if k in totals}


def dcn_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each chip hands to the DCN (multislice) runtime per step, by transfer type
    ("ALL_REDUCE", ...). XLA compiles a collective that spans slices into collectives within
    each slice around `send`s to the megascale runtime, each carrying this chip's share of the
    data; that share is what is counted, loops once per trip."""
    def measure(line: str) -> tuple[str, int] | None:
        m = re.match(r"\s*(?:ROOT )?%\S+ = \(([a-z]+\d*)\[([\d,]*)\].*? send\(", line)
        kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
        return (kind.group(1), _bytes(*m.groups())) if m and kind else None
    return _per_step(hlo_text, measure)


def _bytes(dtype: str, dims: str) -> int:
    return DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)


def _per_step(hlo_text: str, measure) -> dict[str, int]:
    """Sum `measure(line)` -> (kind, bytes) over the entry computation and what it calls, a
    while loop's body once per trip."""
    own, calls, entry, current = {}, {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(2)
            own[current], calls[current] = {}, []
            entry = current if header.group(1) else entry
            continue
        if current is None:
            continue
        found = measure(line)
        if found:
            own[current][found[0]] = own[current].get(found[0], 0) + found[1]
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        for callee in re.findall(r"(?:body|calls|to_apply|condition)=%([\w.\-]+)", line):
            times = int(trips.group(1)) if trips and f"body=%{callee}" in line else 1
            calls[current].append((callee, times))
        for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
            calls[current] += [(c.strip().lstrip("%"), 1) for c in group.split(",")]

    def total(name: str, seen: frozenset) -> dict[str, int]:
        out = dict(own.get(name, {}))
        for callee, times in calls.get(name, []):
            if callee in own and callee not in seen:
                for kind, value in total(callee, seen | {name}).items():
                    out[kind] = out.get(kind, 0) + times * value
        return out
    totals = total(entry, frozenset()) if entry else {}
    return {k: v for k, v in totals.items() if v}

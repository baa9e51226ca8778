"""XLA's TPU cost model on a compiled step: its predicted step time, the bytes it moves and
the temporaries it needs per chip.

The prediction is the compiler's `optimal_seconds`, a per-op roofline: each op costs the
larger of its FLOPs at the chip's matmul rate and its bytes at the HBM rate, collectives
are priced like HBM traffic (not as ICI transfers), and nothing overlaps. For ViT steps
the bytes term dominates, so it ranks programs by memory traffic: an estimate, not a
measured time. XLA cannot see inside a Pallas kernel: the fused attention
(vitpod/fused_attention.py) is priced from the bytes and FLOPs it declares (docs/tpu_step.md).
"""

# With default flags, memory-space assignment's sliced prefetch inserts `ConcatBitcast`
# custom calls that the cost model prices at -1 s each, so whole steps come out negative;
# compiled without them, the same lowering gets a meaningful estimate.
COMPILER_OPTIONS = {"xla_tpu_sliced_prefetch_max_slices": 0}
CAVEAT = ("XLA's TPU cost-model estimate, not a measurement: a per-op roofline that is mostly "
          "memory-bound for this step, with collectives priced as HBM traffic and the fused "
          "attention kernel at the cost it declares")


def estimate(lowered) -> dict:
    """The cost model's view of a lowered TPU step, per chip: predicted seconds, FLOPs,
    bytes accessed and temporary bytes (from a compile with COMPILER_OPTIONS)."""
    compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"seconds": float(cost["optimal_seconds"]), "flops": float(cost["flops"]),
            "bytes_accessed": float(cost["bytes accessed"]),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "compiled": compiled}

"""The train step compiled ahead of time for a TPU topology, on this CPU (libtpu describes
the devices; no TPU is attached): its memory, FLOPs and program text for `plan`.
"""

import dataclasses
import os
import re

from vitpod.errors import UserError

# Per chip: peak bf16 FLOP/s, HBM bytes, and the chip config get_topology_desc needs.
CHIPS = {
    "v4": (275e12, 32 * 2**30, "megacore"),
    "v5e": (197e12, 16 * 2**30, "default"),
    "v5": (459e12, 95 * 2**30, "megacore"),  # v5p
    "v6e": (918e12, 32 * 2**30, "default"),
}
# Per chip: data-center network (between slices) bits per second, from the comparison table
# of https://cloud.google.com/tpu/docs/tpu7x; none is documented for v4 or v5e.
DCN_BITS_PER_SEC = {"v5": 50e9, "v6e": 100e9}


def tpu_devices(topology: str, num_slices: int = 1):
    """The devices of `num_slices` slices of a TPU topology (multislice: their `slice_index`
    tells them apart), described by libtpu without any TPU attached."""
    gen = topology.split(":")[0]
    if gen not in CHIPS or not re.fullmatch(r"\w+:\d+(x\d+)*", topology):
        raise UserError(f"--topology={topology!r}: write GEN:AxB[xC] with GEN one of "
                        f"{', '.join(CHIPS)} (v4:2x2x4 is a v4-32, v5e:2x4 a v5e-8)")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError("plan compiles for TPUs with libtpu: install the tpu extra "
                        "(pip install -e '.[tpu]')") from None
    if num_slices < 1:
        raise UserError(f"--num_slices={num_slices} must be >= 1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no host probing
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        chip_config_name=CHIPS[gen][2],
                                        num_slices=num_slices).devices


def step_flops(config, tx, mesh, num_classes: int, batch_abstract) -> float:
    """Model FLOPs per device of one train step. XLA's cost analysis counts a loop's body
    once, so they come from the same step with 1 and 2 unrolled layers and no accumulation
    (small compiles), extrapolated to the model's depth; remat's recomputation is not
    counted, as MFU defines it."""
    import jax

    from vitpod import model, steps

    depth = model.parse_variant(config.model.variant)
    per_depth = []
    for layers in (1, 2):
        small = config.copy_and_resolve_references()
        small.update_from_flattened_dict({
            "model.variant": model.variant_name(dataclasses.replace(depth, num_layers=layers)),
            "model.scan_layers": False, "model.remat": "none", "grad_accum_steps": 1})
        state = jax.eval_shape(steps.state_initializer(small, num_classes, tx, mesh), None)
        graphdef, _ = model.abstract_model(small.model, small.data.image_size, num_classes)
        cost = steps.make_train_step(graphdef, tx, mesh, small, pack=False).lower(
            state, batch_abstract).compile().cost_analysis()
        per_depth.append(float((cost[0] if isinstance(cost, list) else cost)["flops"]))
    return per_depth[0] + (depth.num_layers - 1) * (per_depth[1] - per_depth[0])


def lower_train_step(config, devices, num_classes: int):
    """The train step lowered for `devices`: (lowered, mesh shape, param bytes and
    optimizer-state bytes per device, (tx, mesh, abstract batch))."""
    import jax
    import jax.numpy as jnp

    from vitpod import model, optim, parallel, steps
    from vitpod.planning import startup

    config.data.train_dir = config.data.train_dir or "(not read by plan)"
    start = startup.check(config, devices, num_classes)  # the launch's own mesh and state
    mesh, state = start.mesh, start.state
    shape = (mesh.shape["data"], mesh.shape["fsdp"])
    tx = optim.make(config.optim, config.total_steps)
    graphdef, _ = model.abstract_model(config.model, config.data.image_size, num_classes)
    step = steps.make_train_step(graphdef, tx, mesh, config, pack=False)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    size, batch = config.data.image_size, config.batch_size
    spec = {"image": ((batch, size, size, 3), jnp.uint8), "label": ((batch,), jnp.int32),
            "valid": ((batch,), jnp.float32)}
    batch_abstract = {k: jax.ShapeDtypeStruct(s, d, sharding=rows) for k, (s, d) in spec.items()}

    specs = parallel.state_specs(state, tx, shape[1])

    def nbytes(tree, tree_specs) -> int:  # per device: FSDP shards count 1/fsdp
        return sum(x.size * x.dtype.itemsize // (shape[1] if parallel.is_sharded(s) else 1)
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_specs),
                                   strict=True))

    return (step.lower(state, batch_abstract), shape, nbytes(state["params"], specs["params"]),
            nbytes(state["opt_state"], specs["opt_state"]), (tx, mesh, batch_abstract))


def compile_train_step(config, devices, num_classes: int):
    """The train step compiled for `devices`: (compiled, lowered, mesh shape, param bytes and
    optimizer-state bytes per device, model FLOPs per device per step)."""
    lowered, shape, param_bytes, opt_bytes, (tx, mesh, batch) = lower_train_step(
        config, devices, num_classes)
    compiled = lowered.compile()
    flops = step_flops(config, tx, mesh, num_classes, batch)
    return compiled, lowered, shape, param_bytes, opt_bytes, flops

"""Will a config fit a TPU slice, and how fast should it go? Compiled here, on CPU.

    python -m vitpod.plan --config=configs/vit_b16_ft.py --topology=v4:2x2x4 \
        [--num_classes=1000] [--config.KEY=VALUE ...]

With the `tpu` extra installed (libtpu), compiles the real train step ahead of time for the
topology (`gen:AxB[xC]`: `v4:2x2x4` is a v4-32, `v5e:2x4` a v5e-8, `v5:2x2x1` a v5p-8,
`v6e:2x2` a v6e-4) and prints per-chip HBM (params, optimizer state, temporaries), FLOPs per
step, the step time and img/s per chip implied at 40 % and 60 % MFU, the collective bytes
per step, and whether it fits; if not, the first of FSDP over all chips, full remat and
gradient accumulation (in that order, compiled to check) that makes it fit. Then what each
host must feed the chips (vitpod/planning/input_budget.py): img/s, decode cores, bucket reads/s.
"""

import dataclasses
import json
import math
import os
import re

from absl import flags

from vitpod import cli
from vitpod.errors import UserError, one_line
from vitpod.planning.hlo import collective_bytes

# Per chip: peak bf16 FLOP/s, HBM bytes, and the chip config get_topology_desc needs.
CHIPS = {
    "v4": (275e12, 32 * 2**30, "megacore"),
    "v5e": (197e12, 16 * 2**30, "default"),
    "v5": (459e12, 95 * 2**30, "megacore"),  # v5p
    "v6e": (918e12, 32 * 2**30, "default"),
}


def define_flags() -> None:
    """This entrypoint's flags (defined only when run, so entrypoints import each other)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v4:2x2x4 (a v4-32) or v5e:2x4.")
    flags.DEFINE_integer("num_classes", 1000, "Classes of the dataset (the head's size).")
    flags.DEFINE_enum("format", "text", ["text", "json"], "json: one object.")


def tpu_devices(topology: str):
    """The devices of a TPU topology, described by libtpu without any TPU attached."""
    gen = topology.split(":")[0]
    if gen not in CHIPS or not re.fullmatch(r"\w+:\d+(x\d+)*", topology):
        raise UserError(f"--topology={topology!r}: write GEN:AxB[xC] with GEN one of "
                        f"{', '.join(CHIPS)} (v4:2x2x4 is a v4-32, v5e:2x4 a v5e-8)")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError("plan compiles for TPUs with libtpu: install the tpu extra "
                        "(pip install -e '.[tpu]')") from None
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no host probing
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        chip_config_name=CHIPS[gen][2]).devices


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


def compile_train_step(config, devices, num_classes: int):
    """The train step compiled for `devices`: (compiled, mesh shape, param bytes and
    optimizer-state bytes per device, model FLOPs per device per step)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitpod import config as config_lib
    from vitpod import model, optim, parallel, steps

    shape = config_lib.mesh_shape(config.mesh, len(devices))
    config.data.train_dir = config.data.train_dir or "(not read by plan)"
    config_lib.validate(config, len(devices), 1)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(shape), ("data", "fsdp"),
                             axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    tx = optim.make(config.optim, config.total_steps)
    init = steps.state_initializer(config, num_classes, tx, mesh)
    state = jax.eval_shape(init, None)
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

    compiled = step.lower(state, batch_abstract).compile()
    flops = step_flops(config, tx, mesh, num_classes, batch_abstract)
    return (compiled, shape, nbytes(state["params"], specs["params"]),
            nbytes(state["opt_state"], specs["opt_state"]), flops)


def _short(x: float) -> float:
    return float(f"{x:.4g}")


def plan(config, topology: str, num_classes: int, input_budget: bool = True) -> dict:
    """The plan for `config` on `topology`, with what its hosts must feed it (`input`).
    When it does not fit, also the first remedy that does, found by compiling."""
    config, model_line = _architecture(config)
    result = {"model": model_line, **_fit(config, topology, num_classes)}
    rates = result.get("with_remedy", result)
    if input_budget and rates.get("img_per_sec_per_chip_at_60pct_mfu"):
        from vitpod.planning import input_budget as budget_lib

        hosts = len({d.process_index for d in tpu_devices(topology)})
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


def _fit(config, topology: str, num_classes: int) -> dict:
    """The plan; when it does not fit, the first remedy that does, found by compiling: FSDP
    over every chip, then that with `model.remat=full`, then gradient accumulation on top (a
    divisor of each device's rows, sized from how far over HBM the last try was)."""
    devices = tpu_devices(topology)
    chips = len(devices)
    result = _plan_once(config, devices, topology, num_classes)
    if result["fits"]:
        return result
    need, overrides, remedies = result.pop("_need", 2), {}, []
    if result.get("mesh", {}).get("fsdp", config.mesh.fsdp) != chips:
        overrides = {"mesh.data": 1, "mesh.fsdp": -1}  # all chips, on whatever slice
        remedies.append(overrides)
    if config.model.remat != "full":
        overrides = {**overrides, "model.remat": "full"}
        remedies.append(overrides)
    for trial in remedies:
        tried = _plan_once(_override(config, trial), devices, topology, num_classes)
        if tried["fits"]:
            return _fits_with(result, trial, tried)
        need = tried.pop("_need", need)
    rows = config.batch_size // chips // config.grad_accum_steps
    for factor in [a for a in range(max(2, math.ceil(need)), rows + 1) if rows % a == 0][:3]:
        trial = {**overrides, "grad_accum_steps": config.grad_accum_steps * factor}
        tried = _plan_once(_override(config, trial), devices, topology, num_classes)
        if tried["fits"]:
            return _fits_with(result, trial, tried)
    result["verdict"] += ("; FSDP over all chips, remat and gradient accumulation do not make "
                          "it fit: lower batch_size or image_size, or use a larger slice")
    return result


def _override(config, overrides: dict):
    trial = config.copy_and_resolve_references()
    trial.update_from_flattened_dict(overrides)
    return trial


def _fits_with(result: dict, overrides: dict, tried: dict) -> dict:
    result["fits_with"] = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    result["with_remedy"] = {k: tried[k] for k in (
        "mesh", "total_gib", "tflops_per_step_per_chip", "img_per_sec_per_chip_at_40pct_mfu",
        "img_per_sec_per_chip_at_60pct_mfu")}
    result["verdict"] += f"; fits with {result['fits_with']} ({tried['total_gib']} GiB per chip)"
    return result


def _plan_once(config, devices, topology: str, num_classes: int) -> dict:
    from vitpod import config as config_lib

    peak, hbm, _ = CHIPS[topology.split(":")[0]]
    data, fsdp = config_lib.mesh_shape(config.mesh, len(devices))
    try:
        compiled, shape, param_bytes, opt_bytes, flops = compile_train_step(config, devices,
                                                                            num_classes)
    except Exception as e:  # noqa: BLE001  XLA refuses programs over HBM at compile time
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        # "... HLO temporaries (780.83G) exceeds available HBM (15.75G)": how far over.
        sizes = re.findall(r"\(([\d.]+)([KMG])\)", text)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}
        need = (float(sizes[0][0]) * scale[sizes[0][1]] / (float(sizes[1][0]) * scale[
            sizes[1][1]])) if len(sizes) >= 2 else 2
        return {"topology": topology, "chips": len(devices), "mesh": {"data": data, "fsdp": fsdp},
                "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps,
                "fits": False, "_need": need,
                "verdict": f"does not fit: {one_line(text)[:200]}"}
    mem = compiled.memory_analysis()
    per_chip_batch = config.batch_size / len(devices)
    used = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
            + mem.generated_code_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    out = {
        "topology": topology, "chips": len(devices), "mesh": {"data": shape[0],
                                                               "fsdp": shape[1]},
        "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps,
        "hbm_per_chip_gib": _short(hbm / 2**30),
        "params_gib": _short(param_bytes / 2**30),
        "optimizer_gib": _short(opt_bytes / 2**30),
        "temporaries_gib": _short(mem.temp_size_in_bytes / 2**30),
        "code_gib": _short(mem.generated_code_size_in_bytes / 2**30),
        "total_gib": _short(used / 2**30),
        "tflops_per_step_per_chip": _short(flops / 1e12),
        "collective_bytes_per_step": collective_bytes(compiled.as_text()),
    }
    for mfu in (0.4, 0.6):
        seconds = flops / (peak * mfu)
        out[f"step_seconds_at_{int(mfu * 100)}pct_mfu"] = _short(seconds)
        out[f"img_per_sec_per_chip_at_{int(mfu * 100)}pct_mfu"] = round(per_chip_batch / seconds)
    out["fits"] = used <= hbm
    out["verdict"] = f"{'fits' if out['fits'] else 'does not fit'}: {used / 2**30:.2f} GiB of " \
                     f"{hbm / 2**30:.0f} GiB HBM per chip"
    if not out["fits"]:
        room = hbm - (used - mem.temp_size_in_bytes)
        out["_need"] = mem.temp_size_in_bytes / room if room > 0 else 10**9
    return out


def main(argv) -> None:
    f = flags.FLAGS
    if not f.topology:
        raise UserError("pass --topology=GEN:AxB[xC], e.g. v4:2x2x4 (a v4-32)")
    result = plan(cli.config(f.config), f.topology, f.num_classes)
    if f.format == "json":
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key == "input":
            for k, v in value.items():
                print(f"{'input.' + k:36s} {v}")
        else:
            print(f"{key:36s} {value}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, run nothing
    define_flags()
    cli.run(main)

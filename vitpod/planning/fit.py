"""Does the train step fit a TPU slice's HBM, and if not, what makes it fit: the step
compiled for the topology (planning/compile.py), its memory and speed per chip, then the
remedies compiled in order until one fits.
"""

import math
import re

from vitpod.errors import one_line
from vitpod.planning.compile import CHIPS, compile_train_step, tpu_devices
from vitpod.planning.hlo import collective_bytes


def search(config, topology: str, num_classes: int) -> dict:
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


def _short(x: float) -> float:
    return float(f"{x:.4g}")

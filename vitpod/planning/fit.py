"""Does the train step fit a TPU slice's HBM, and if not, what makes it fit: the step
compiled for the topology (planning/compile.py), its memory and speed per chip, then the
remedies compiled in order until one fits.
"""

import math
import re

from vitpod.errors import one_line
from vitpod.planning import cost
from vitpod.planning.compile import CHIPS, DCN_BITS_PER_SEC, compile_train_step, tpu_devices
from vitpod.planning.hlo import collective_bytes, dcn_bytes


def search(config, topology: str, num_classes: int, num_slices: int = 1) -> dict:
    """The plan; when it does not fit, the first remedy that does, found by compiling: FSDP
    over every chip, then that with `model.remat=full`, then gradient accumulation on top (a
    divisor of each device's rows, sized from how far over HBM the last try was)."""
    devices = tpu_devices(topology, num_slices)
    chips = len(devices)
    result = _plan_once(config, devices, topology, num_classes)
    if result["fits"]:
        return result
    need, overrides, remedies = result.pop("_need", 2), {}, []
    if result.get("mesh", {}).get("fsdp", config.mesh.fsdp) != chips // num_slices:
        overrides = {"mesh.data": 1, "mesh.fsdp": -1}  # all chips of a slice, whatever slice
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
        "img_per_sec_per_chip_at_60pct_mfu", *PREDICTED, "dcn_bytes_per_step_per_chip",
        "dcn_gbps_per_chip_at_40pct_mfu", "dcn_gbps_per_chip_at_60pct_mfu", "dcn_verdict")
        if k in tried}
    result["verdict"] += f"; fits with {result['fits_with']} ({tried['total_gib']} GiB per chip)"
    return result


def _plan_once(config, devices, topology: str, num_classes: int) -> dict:
    from vitpod import config as config_lib
    from vitpod import mesh as mesh_lib

    gen = topology.split(":")[0]
    peak, hbm, _ = CHIPS[gen]
    slices = mesh_lib.num_slices(devices)
    (dcn_data, _), (data, fsdp) = config_lib.hybrid_mesh_shapes(config.mesh, len(devices), slices)
    mesh = {"data": data, "fsdp": fsdp} if slices == 1 else {
        "dcn_data": dcn_data, "data": data, "fsdp": fsdp}  # config keys: data is per slice
    try:
        compiled, lowered, _, param_bytes, opt_bytes, flops = compile_train_step(
            config, devices, num_classes)
    except Exception as e:  # noqa: BLE001  XLA refuses programs over HBM at compile time
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        # "... HLO temporaries (780.83G) exceeds available HBM (15.75G)": how far over.
        sizes = re.findall(r"\(([\d.]+)([KMG])\)", text)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}
        need = (float(sizes[0][0]) * scale[sizes[0][1]] / (float(sizes[1][0]) * scale[
            sizes[1][1]])) if len(sizes) >= 2 else 2
        return {"topology": topology, "chips": len(devices), "mesh": mesh,
                "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps,
                "fits": False, "_need": need,
                "verdict": f"does not fit: {one_line(text)[:200]}"}
    mem = compiled.memory_analysis()
    per_chip_batch = config.batch_size / len(devices)
    used = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
            + mem.generated_code_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    out = {
        "topology": topology, "chips": len(devices), "mesh": mesh,
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
    out.update(_predicted(cost.estimate(lowered), flops, peak, per_chip_batch))
    if slices > 1:
        out.update(_dcn(dcn_bytes(compiled.as_text()), slices, flops, peak,
                        DCN_BITS_PER_SEC.get(gen), gen))
    out["fits"] = used <= hbm
    out["verdict"] = f"{'fits' if out['fits'] else 'does not fit'}: {used / 2**30:.2f} GiB of " \
                     f"{hbm / 2**30:.0f} GiB HBM per chip"
    if not out["fits"]:
        room = hbm - (used - mem.temp_size_in_bytes)
        out["_need"] = mem.temp_size_in_bytes / room if room > 0 else 10**9
    return out


PREDICTED = ("predicted_step_seconds", "predicted_img_per_sec_per_chip", "predicted_mfu",
             "bytes_accessed_per_step", "temp_gib", "predicted_by")


def _predicted(estimate: dict, flops: float, peak: float, per_chip_batch: float) -> dict:
    """The cost model's step time, the img/s per chip and MFU (against the datasheet peak
    above, not the cost model's own calibrated rates) it implies, the bytes it moves and the
    temporaries of the program it was computed for (compiled with cost.COMPILER_OPTIONS)."""
    seconds = estimate["seconds"]
    if seconds <= 0:  # e.g. a custom call the cost model prices at -1 s
        return {"predicted_by": f"{cost.CAVEAT}; it gave {seconds:g} s for this program"}
    return {"predicted_step_seconds": _short(seconds),
            "predicted_img_per_sec_per_chip": round(per_chip_batch / seconds),
            "predicted_mfu": _short(flops / seconds / peak),
            "bytes_accessed_per_step": round(estimate["bytes_accessed"]),
            "temp_gib": _short(estimate["temp_bytes"] / 2**30), "predicted_by": cost.CAVEAT}


def _dcn(sent: dict[str, int], slices: int, flops: float, peak: float,
         bits_per_sec: float | None, gen: str) -> dict:
    """What crossing slices asks of the DCN per chip: the bytes each chip hands the DCN
    runtime (read from the compiled HLO) sent as a ring all-reduce over the slices, 2(k-1)/k
    times that share; the bandwidth that takes at 40 and 60 % MFU (the transfer as long as the
    step's compute); against the documented per-chip figure, and the slice count beyond which
    it is DCN-bound, each slice keeping its rows per chip (the share does not change with k)."""
    share = sum(sent.values())
    ring = 2 * (slices - 1) / slices
    out = {"dcn_bytes_per_step_per_chip": round(share * ring),
           "dcn_bytes_from": "compiled HLO: this chip's share of the cross-slice transfers "
                             f"{dict(sent)} x 2(k-1)/k (ring all-reduce over k={slices} slices)"}
    need = {}
    for mfu in (40, 60):
        need[mfu] = share * ring * 8 / (flops / (peak * mfu / 100))
        out[f"dcn_gbps_per_chip_at_{mfu}pct_mfu"] = _short(need[mfu] / 1e9)
    name = {"v5": "v5p"}.get(gen, gen)
    if not bits_per_sec:
        out["dcn_verdict"] = (f"no per-chip DCN bandwidth is documented for {name}: compare "
                              f"{out['dcn_gbps_per_chip_at_60pct_mfu']} Gb/s per chip at 60 % "
                              "MFU with the network the slices get")
        return out
    bound = need[60] > bits_per_sec
    verdict = (f"{'DCN-bound' if bound else 'not DCN-bound'} on {slices} slices: "
               f"{out['dcn_gbps_per_chip_at_40pct_mfu']} / {out['dcn_gbps_per_chip_at_60pct_mfu']}"
               f" Gb/s per chip at 40 / 60 % MFU, {name} has {bits_per_sec / 1e9:g}")
    limit = need[60] / ring * 2  # a ring's 2(k-1)/k tends to 2
    if limit <= bits_per_sec:
        verdict += "; not DCN-bound at 60 % MFU on any number of slices"
    else:  # the largest k with need(k) = limit (k-1)/k within the figure
        most = math.floor(1 / (1 - bits_per_sec / limit))
        verdict += ("; DCN-bound at 60 % MFU from 2 slices on" if most < 2 else
                    f"; DCN-bound at 60 % MFU beyond {most} slices")
    out["dcn_verdict"] = verdict
    return out


def _short(x: float) -> float:
    return float(f"{x:.4g}")

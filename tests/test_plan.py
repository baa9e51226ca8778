"""`plan`: the real train step compiled for TPU topologies on this CPU (needs libtpu)."""

import json
import math
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT, load_config
from vitpod import model, plan
from vitpod.errors import UserError

pytest.importorskip("libtpu", reason="plan needs libtpu: install the tpu extra")


def param_bytes(config, classes: int) -> int:
    _, abstract = model.abstract_model(config.model, config.data.image_size, classes)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize("topology,chips,host_rows", [
    ("v4:2x2x1", 4, {"0": [[0, 64]]}),
    # a v4-16: its two hosts alternate on the batch, 8 rows per chip
    ("v4:2x2x2", 8, {"0": [[0, 8], [16, 24], [32, 40], [48, 56]],
                     "1": [[8, 16], [24, 32], [40, 48], [56, 64]]})])
def test_a_small_vit_fits_and_its_step_sends_one_gradient_all_reduce(topology, chips,
                                                                       host_rows):
    config = load_config("tiny", batch_size=64)
    done = subprocess.run([sys.executable, "-m", "vitpod.plan", "--config=configs/tiny.py",
                           "--config.batch_size=64", f"--topology={topology}",
                           "--num_classes=5", "--format=json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["host_rows"] == host_rows
    assert result["fits"] and result["chips"] == chips
    assert result["mesh"] == {"data": chips, "fsdp": 1}
    assert result["tflops_per_step_per_chip"] > 0
    assert result["img_per_sec_per_chip_at_60pct_mfu"] > result[
        "img_per_sec_per_chip_at_40pct_mfu"] > 0
    # XLA's cost model, compiled without sliced prefetch: a positive estimate, said to be one.
    assert result["predicted_step_seconds"] > 0 and result["bytes_accessed_per_step"] > 0
    assert result["predicted_img_per_sec_per_chip"] == pytest.approx(
        64 / chips / result["predicted_step_seconds"], rel=0.01)
    assert 0 <= result["temp_gib"] < 1 and 0 < result["predicted_mfu"] < 1
    assert "not a measurement" in result["predicted_by"]
    # Pure data parallelism: the only collective is the all-reduce of the f32 gradients
    # (plus four metric sums), within 5 %.
    sent = result["collective_bytes_per_step"]
    assert set(sent) == {"all-reduce"}
    assert sent["all-reduce"] == pytest.approx(param_bytes(config, 5), rel=0.05)


def test_bad_topology_is_one_line():
    with pytest.raises(UserError, match="--topology='v9:2x2': write GEN:AxB"):
        plan.plan(load_config("tiny"), "v9:2x2", 5)
    out = subprocess.run([sys.executable, "-m", "vitpod.plan", "--config=configs/tiny.py"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: pass --topology=GEN:AxB[xC], e.g. v4:2x2x4 (a v4-32)")


def test_fsdp_on_a_tpu_topology_gathers_the_layers_inside_the_loop():
    """v4:2x2x1 with fsdp=4 and full remat: the compiled step all-gathers weights, inside
    the scan's loops as well. (Bytes are checked against the theory on CPU, test_parallel:
    XLA's TPU passes gather some weights in bf16, the precision its matmuls run at, and turn
    small reduce-scatters into all-reduces.)"""
    config = load_config("tiny", batch_size=64, mesh__data=1, mesh__fsdp=-1,
                         model__remat="full")
    result = plan.plan(config, "v4:2x2x1", 5)
    assert result["fits"] and result["mesh"] == {"data": 1, "fsdp": 4}
    assert result["params_gib"] < param_bytes(config, 5) / 2**30 / 3  # mostly sharded
    assert result["collective_bytes_per_step"]["all-gather"] > param_bytes(config, 5) / 2


def test_plan_says_what_each_host_must_feed_the_chips(colors):
    """The input budget: img/s per host at 40 and 60 % MFU, measured CPU ms per image on the
    config's own train_dir, the decode cores that takes, the whole slice's reads per second."""
    config = load_config("tiny", batch_size=64, data__train_dir=str(colors / "train"))
    result = plan.plan(config, "v4:2x2x4", 5)  # a v4-32: 4 hosts of 4 chips
    budget = result["input"]
    assert budget["hosts"] == 4 and f"images of {colors / 'train'}" in budget["measured_on"]
    for pct in (40, 60):
        assert budget[f"img_per_sec_per_host_at_{pct}pct_mfu"] == 4 * result[
            f"img_per_sec_per_chip_at_{pct}pct_mfu"]
    assert budget["cpu_ms_per_image"] > 0
    assert budget["workers_per_host"] == math.ceil(
        budget["img_per_sec_per_host_at_60pct_mfu"] * budget["cpu_ms_per_image"] / 1000)
    assert budget["reads_per_sec"] == 4 * budget["img_per_sec_per_host_at_60pct_mfu"]
    assert "more than a fresh bucket serves" in budget["verdict"]  # a pico model is fast
    unreachable = plan.plan(load_config("tiny", batch_size=64, data__train_dir="/no/such"),
                            "v4:2x2x1", 5)
    assert "representative 300-500 px JPEGs" in unreachable["input"]["measured_on"]


def test_plan_counts_a_request_per_run_for_packed_data_read_in_blocks(colors, tmp_path):
    from vitpod.data import packing

    packing.pack(str(colors / "train"), str(tmp_path / "packed"))
    config = load_config("tiny", batch_size=64, data__train_dir=str(tmp_path / "packed"),
                         data__shuffle="blocks", data__shuffle_block=32)
    budget = plan.plan(config, "v4:2x2x4", 5)["input"]
    assert f"images of {tmp_path / 'packed'}" in budget["measured_on"]
    assert budget["reads_per_sec"] == math.ceil(
        4 * budget["img_per_sec_per_host_at_60pct_mfu"] / 32)


def test_plan_plans_the_init_from_checkpoints_architecture_as_train_does(tmp_path):
    """A run with model.init_from trains the checkpoint's shape whatever model.variant says:
    the plan compiles that shape, and says so; an unreadable checkpoint leaves the variant."""
    from tests.test_hf import _hf_model

    _hf_model(tmp_path / "hf", variant="w48-d3-h4-m96/4")
    config = load_config("tiny", batch_size=64, model__init_from=str(tmp_path / "hf"))
    result = plan.plan(config, "v4:2x2x1", 5, input_budget=False)
    assert result["model"] == f"w48-d3-h4-m96/4 (from model.init_from={tmp_path / 'hf'})"
    assert config.model.variant == "pico/4"  # the caller's config is left as it was
    adopted = load_config("tiny", model__variant="w48-d3-h4-m96/4")
    assert result["collective_bytes_per_step"]["all-reduce"] == pytest.approx(
        param_bytes(adopted, 5), rel=0.05)
    offline = plan.plan(load_config("tiny", batch_size=64, model__init_from="/no/such/ckpt"),
                        "v4:2x2x1", 5, input_budget=False)
    assert offline["model"].startswith("pico/4 (model.variant: model.init_from cannot be read")


def test_two_slices_lay_the_data_axis_over_dcn_and_say_what_it_asks_of_it():
    """v5e:4x4 x 2 slices: each slice a contiguous block of the data axis; the compiled step
    hands the DCN runtime each chip's share of the gradient all-reduce, nothing else; v5e has
    no documented DCN figure, so the plan gives the bandwidth and says so."""
    from vitpod import mesh
    from vitpod.planning.compile import tpu_devices

    config = load_config("tiny", batch_size=64)
    grid = mesh.device_grid(config.mesh, tpu_devices("v5e:4x4", 2), 2)
    assert grid.shape == (32, 1)
    assert [d.slice_index for d in grid.flat] == [0] * 16 + [1] * 16
    result = plan.plan(config, "v5e:4x4", 5, input_budget=False, num_slices=2)
    assert result["fits"] and result["chips"] == 32
    assert result["mesh"] == {"dcn_data": 2, "data": 16, "fsdp": 1}
    # 8 hosts, each reading 8 of the 64 rows in the runs its chips hold: slice 0's hosts in
    # the first 32 rows, interleaved as a v5e-16's are.
    assert len(result["host_rows"]) == 8
    assert result["host_rows"]["0"] == [[0, 4], [12, 14], [30, 32]]
    assert all(sum(b - a for a, b in runs) == 8 for runs in result["host_rows"].values())
    assert all(runs[-1][1] <= 32 for h, runs in result["host_rows"].items() if int(h) < 4)
    # Each chip's share of the gradient (sent once each way: 2(k-1)/k = 1 for 2 slices); XLA
    # pads each leaf's share to whole tiles, which for a pico model is most of it.
    share = result["dcn_bytes_per_step_per_chip"]
    assert param_bytes(config, 5) / 16 <= share <= param_bytes(config, 5)
    assert "ALL_REDUCE" in result["dcn_bytes_from"]
    assert result["dcn_gbps_per_chip_at_60pct_mfu"] > result["dcn_gbps_per_chip_at_40pct_mfu"]
    assert result["dcn_verdict"].startswith("no per-chip DCN bandwidth is documented for v5e")


def test_the_dcn_verdict_names_the_slice_count_beyond_which_it_is_bound():
    from vitpod.planning import fit

    # 1 MB share per chip, 1 TFLOP per step on a 1 PFLOP/s chip: 2.5 / 1.67 ms steps.
    out = fit._dcn({"ALL_REDUCE": 10**6}, 2, 1e12, 1e15, 5e9, "v5")
    assert out["dcn_bytes_per_step_per_chip"] == 10**6
    assert out["dcn_gbps_per_chip_at_60pct_mfu"] == pytest.approx(4.8)
    # need(k) = 4.8 * 2(k-1)/k Gb/s: within 5 Gb/s up to k = 2, beyond it bound.
    assert out["dcn_verdict"] == ("not DCN-bound on 2 slices: 3.2 / 4.8 Gb/s per chip at 40 "
                                  "/ 60 % MFU, v5p has 5; DCN-bound at 60 % MFU beyond 2 slices")
    assert "not DCN-bound at 60 % MFU on any number" in fit._dcn(
        {"ALL_REDUCE": 10**6}, 4, 1e12, 1e15, 50e9, "v5")["dcn_verdict"]
    assert fit._dcn({"ALL_REDUCE": 10**6}, 2, 1e12, 1e15, 1e9, "v6e")["dcn_verdict"].endswith(
        "v6e has 1; DCN-bound at 60 % MFU from 2 slices on")

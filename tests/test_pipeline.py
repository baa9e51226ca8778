"""The step is the whole data state: batches depend only on (manifest, seed, step)."""

import numpy as np
import pytest
from absl import logging

from tests.conftest import load_config, make_imagefolder
from vitpod.data import imagefolder, pipeline


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("pipe"), {"a": 7, "b": 6, "c": 7})
    return imagefolder.scan(str(root))


@pytest.fixture
def data_cfg():
    cfg = load_config("tiny").data
    cfg.unlock()
    return cfg


def _steps(split, data_cfg, start=0, total=6, batch=8, hosts=1, host=0, rows=None):
    """Host `host` of `hosts`' batches: one block of rows each, or the given `rows` runs."""
    local = batch // hosts
    return list(pipeline.train_batches(split, data_cfg, seed=3, global_batch=batch,
                                       start_step=start, total_steps=total,
                                       rows=rows or ((host * local, (host + 1) * local),)))


def test_resuming_at_step_s_yields_the_same_batches(split, data_cfg):
    full = _steps(split, data_cfg)
    resumed = _steps(split, data_cfg, start=4)
    assert len(full) == 6 and len(resumed) == 2
    for a, b in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_disjoint_rows_that_rebuild_the_global_batch(split, data_cfg, hosts):
    full = _steps(split, data_cfg)
    per_host = [_steps(split, data_cfg, hosts=hosts, host=h) for h in range(hosts)]
    for step, whole in enumerate(full):
        parts = [per_host[h][step] for h in range(hosts)]
        assert all(len(p["index"]) == 8 // hosts for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["index"] for p in parts]), whole["index"])
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])


@pytest.mark.parametrize("rows", [
    [((0, 1), (2, 3), (4, 5), (6, 7)), ((1, 2), (3, 4), (5, 6), (7, 8))],  # a v4-16's hosts
    [((0, 1), (6, 7)), ((1, 3),), ((3, 4), (5, 6)), ((4, 5), (7, 8))]])  # 4 hosts, v5e-like
def test_hosts_reading_interleaved_runs_rebuild_the_global_batch(split, data_cfg, rows):
    """Each host reads exactly its runs of rows, in ascending order: put back where the runs
    say, they are the global batch, augmentation included."""
    full = _steps(split, data_cfg)
    per_host = [_steps(split, data_cfg, rows=r) for r in rows]
    for step, whole in enumerate(full):
        for key in ("index", "image", "label"):
            rebuilt = np.empty_like(whole[key])
            for h, runs in enumerate(rows):
                positions = [i for a, b in runs for i in range(a, b)]
                rebuilt[positions] = per_host[h][step][key]
            np.testing.assert_array_equal(rebuilt, whole[key])


@pytest.mark.parametrize("shuffle,hosts", [("global", 1), ("global", 2), ("blocks", 2)])
def test_batches_equal_grains_random_map_then_batch(split, data_cfg, shuffle, hosts):
    """HostBatch reads a batch's files together and gives example p the generator grain's
    random_map gives element p: the batches are those of random_map(...).batch(b)[h::H],
    which earlier versions trained on, bit for bit (augmentation included)."""
    import grain

    data_cfg.shuffle, data_cfg.shuffle_block, data_cfg.randaug_num_ops = shuffle, 4, 2
    data_cfg.fetch_threads = 8
    n, epochs, seed = len(split.files), 8 * 8 // len(split.files) + 2, 3
    if shuffle == "blocks":
        positions = grain.MapDataset.range(n * epochs).map(
            pipeline.order.BlockOrder(n, seed, 4, data_cfg.shuffle_window))
    else:
        positions = grain.MapDataset.range(n).shuffle(seed=seed).repeat(epochs)
    example = pipeline.TrainExample(
        split, positions, data_cfg.image_size, tuple(data_cfg.crop_scale),
        tuple(data_cfg.crop_ratio), data_cfg.hflip, (2, data_cfg.randaug_magnitude),
        data_cfg.reduced_decode, 4 if shuffle == "blocks" else 1)
    examples = positions.random_map(  # the reference: grain's own random_map, then batch
        lambda i, rng: example.decode(int(i), pipeline.read_example(split, int(i)), rng),
        seed=seed)
    for host in range(hosts):
        ours = _steps(split, data_cfg, start=2, total=8, hosts=hosts, host=host)
        reference = examples.batch(8 // hosts, drop_remainder=True)[host::hosts]
        for step, batch in enumerate(ours, start=2):
            for key in ("index", "image", "label", "valid"):
                np.testing.assert_array_equal(batch[key], reference[step][key], err_msg=key)


def test_each_epoch_is_a_fresh_full_permutation(split, data_cfg):
    n = len(split.files)  # 20 examples, batch 4 -> epochs of 5 steps
    order = np.concatenate([b["index"] for b in _steps(split, data_cfg, total=10, batch=4)])
    first, second = order[:n], order[n:2 * n]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert not np.array_equal(first, second)


def test_worker_processes_give_the_same_batches_as_in_process(split, data_cfg):
    in_process = _steps(split, data_cfg, total=3)
    data_cfg.num_workers = 2
    workers = _steps(split, data_cfg, total=3)
    for a, b in zip(in_process, workers, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_cover_every_file_once_with_padding_masked(split, data_cfg):
    batches = list(pipeline.eval_batches(split, data_cfg, global_batch=8))
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert len(index) == 24 and valid.sum() == len(split.files) == 20
    assert sorted(index[valid == 1]) == list(range(20))


def test_unreadable_files_are_skipped_by_name_every_time(tmp_path, data_cfg, monkeypatch):
    root = make_imagefolder(tmp_path, {"a": 4, "b": 4})
    (root / "a" / "img001.png").write_bytes(b"")  # zero bytes
    (root / "b" / "img002.png").write_bytes((root / "b" / "img000.png").read_bytes()[:50])
    split = imagefolder.scan(str(root))
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    batch = _steps(split, data_cfg, total=1, batch=8)[0]  # one epoch: every file once
    bad = {split.files[i] for i in batch["index"][batch["valid"] == 0]}
    assert bad == {"a/img001.png", "b/img002.png"}
    pipeline.SkipWarner(split)(batch)
    assert sorted(w.split(" ")[3].removeprefix(str(root) + "/") for w in warnings) == sorted(bad)
    again = _steps(split, data_cfg, total=1, batch=8)[0]
    np.testing.assert_array_equal(batch["valid"], again["valid"])


def test_decode_workers_default_is_sized_to_the_host():
    from vitpod.data import pipeline

    assert pipeline.decode_workers(-1, cpus=2, local_devices=8) == 0  # a laptop: threads
    assert pipeline.decode_workers(-1, cpus=24, local_devices=1) == 16  # v5e, 1 chip
    assert pipeline.decode_workers(-1, cpus=240, local_devices=4) == 64  # v4 host
    assert pipeline.decode_workers(3, cpus=240, local_devices=4) == 3  # explicit counts stay
    assert pipeline.decode_workers(0, cpus=240, local_devices=4) == 0


def test_input_budget_counts_the_decoded_batches_the_decode_workers_hold():
    """Each decode worker holds up to read_threads + 1 host batches (the bound the next test
    measures): at ImageNet sizes on a v5e host (192 GB) the default would hold most of it."""
    from tests.conftest import load_config
    from vitpod.planning import input_budget

    data = load_config("tiny", data__image_size=224, data__num_workers=-1).data
    rates = {"chips": 16, "img_per_sec_per_chip_at_40pct_mfu": 900,
             "img_per_sec_per_chip_at_60pct_mfu": 1300}
    v5e = input_budget.budget(rates, 4, "v5e", 3.0, "here", 1.0, data, batch_size=4096)
    host_batch_gib = 1024 * 224 * 224 * 3 / 2**30
    assert v5e["decode_workers"] == 64  # min(112 vCPUs - 2, 16 per chip x 4)
    assert v5e["input_memory_gib_per_host"] == round(64 * 17 * host_batch_gib, 1)
    assert "64 decode workers would hold ~156 GiB of decoded images, over half the host's " \
        "192 GB: lower data.read_threads" in v5e["verdict"]
    data.read_threads = 2
    fewer = input_budget.budget(rates, 4, "v5e", 3.0, "here", 1.0, data, batch_size=4096)
    assert fewer["input_memory_gib_per_host"] == round(64 * 3 * host_batch_gib, 1)
    assert "decode workers would hold" not in fewer["verdict"]
    v4 = input_budget.budget(rates, 4, "v4", 3.0, "here", 1.0, data, batch_size=4096)
    assert v4["decode_workers"] == 64 and "would hold" not in v4["verdict"]  # RAM unknown


def test_read_ahead_holds_only_what_the_read_threads_work_on(split, data_cfg, monkeypatch):
    """grain's default buffer would decode 500 host batches ahead of the step: tens of GB at
    ImageNet sizes in every decode process."""
    import threading
    import time

    from vitpod.data import transforms

    decoded, lock, real = [0], threading.Lock(), transforms.train_transform

    def counting(*args, **kwargs):
        with lock:
            decoded[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "train_transform", counting)
    data_cfg.num_workers, data_cfg.read_threads = 0, 2
    it = pipeline.train_batches(split, data_cfg, seed=3, global_batch=4, start_step=0,
                                total_steps=100)
    next(it)
    time.sleep(1.0)  # time enough to decode all 400 rows, were they asked for
    assert decoded[0] <= (1 + 2) * 4

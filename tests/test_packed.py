"""Packed datasets (`prepare pack`) read like the ImageFolder they came from, in fewer requests."""

import json

import numpy as np
import pytest
from absl import logging
from PIL import Image

from tests.conftest import load_config, make_imagefolder, read_losses
from vitpod import config as config_lib
from vitpod import storage, train, upload
from vitpod.data import imagefolder, order, packed, packing, pipeline
from vitpod.errors import UserError


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An ImageFolder with odd modes, a corrupt, an empty and a truncated file."""
    root = make_imagefolder(tmp_path_factory.mktemp("hostile"), {"a": 12, "b": 11, "c": 13})
    Image.new("I;16", (9, 7), 40000).save(root / "a" / "grey16.png")
    Image.new("P", (8, 8), 3).save(root / "b" / "palette.png")
    Image.new("CMYK", (10, 6), (10, 200, 30, 0)).save(root / "c" / "cmyk.jpg")
    (root / "a" / "img001.png").write_bytes(b"")
    (root / "b" / "img002.png").write_bytes(b"not an image at all")
    (root / "c" / "img003.png").write_bytes((root / "c" / "img004.png").read_bytes()[:60])
    return root


@pytest.fixture(scope="module")
def packed_hostile(hostile, tmp_path_factory):
    dst = tmp_path_factory.mktemp("packed") / "train"
    packing.pack(str(hostile), str(dst), shard_mb=0.002)  # shards of 32 records: two
    return dst


def data_cfg(**overrides):
    cfg = load_config("tiny").data
    cfg.unlock()
    cfg.update(overrides)
    return cfg


def batches(split, cfg, steps=8, batch=8, hosts=1, host=0):
    local = batch // hosts
    return list(pipeline.train_batches(split, cfg, seed=5, global_batch=batch, start_step=0,
                                       total_steps=steps,
                                       rows=((host * local, (host + 1) * local),)))


def test_blocks_order_is_a_permutation_of_shuffled_runs_that_changes_each_epoch():
    n, block, window = 103, 8, 3
    epochs = [order.block_epoch(n, seed=1, epoch=e, block=block, window=window)
              for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
        positions = order.pack_position(n)[epoch]
        runs = [positions[i:i + block] for i in range(0, n, block)]
        # each run is consecutive pack positions (modulo the wrap at the end)
        assert all(np.all(np.diff(r) % n == 1) for r in runs)
        assert len(runs[-1]) == n % block  # the short run stays last
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(epochs[2], order.block_epoch(n, 1, 2, block, window))
    assert sorted(order.pack_order(n)) == list(range(n))


def test_shards_hold_whole_runs_of_the_formats_run_length(packed_hostile):
    """The run length is the packed format's own (recorded in its index); the default
    shuffle_block reads a run per request."""
    index = json.loads((packed_hostile / packed.INDEX).read_text())
    assert index["run_records"] == packed.RUN and index["shard_records"] % packed.RUN == 0
    assert config_lib.defaults().data.shuffle_block == packed.RUN


def test_pack_writes_shards_in_pack_order_with_every_file_unchanged(hostile, packed_hostile):
    split = imagefolder.scan(str(hostile))
    index = json.loads((packed_hostile / packed.INDEX).read_text())
    assert index["files"] == list(split.files) and index["labels"] == list(split.labels)
    assert index["counts"] == {"a": 13, "b": 12, "c": 14}
    assert len(index["shards"]) == -(-len(split.files) // index["shard_records"]) > 1
    from array_record.python import array_record_module

    records = []
    for name in index["shards"]:
        reader = array_record_module.ArrayRecordReader(str(packed_hostile / name))
        records += reader.read_all()
    for position, record in enumerate(records):
        i = int(order.pack_order(len(split.files))[position])
        assert packed.decode(record) == (split.labels[i], split.files[i],
                                         (hostile / split.files[i]).read_bytes())


@pytest.mark.parametrize("shuffle", ["global", "blocks"])
@pytest.mark.parametrize("hosts", [1, 2])
def test_packed_data_gives_the_imagefolder_batches(hostile, packed_hostile, shuffle, hosts):
    cfg = data_cfg(shuffle=shuffle, shuffle_block=4, shuffle_window=2)
    folder, packs = imagefolder.scan(str(hostile)), imagefolder.scan(str(packed_hostile))
    assert packs.shards and (folder.classes, folder.files) == (packs.classes, packs.files)
    for host in range(hosts):
        a = batches(folder, cfg, hosts=hosts, host=host)
        b = batches(packs, cfg, hosts=hosts, host=host)
        for x, y in zip(a, b, strict=True):
            for key in ("image", "label", "valid", "index"):
                np.testing.assert_array_equal(x[key], y[key])
    valid = np.concatenate([x["valid"] for x in a])
    assert valid.min() == 0 and valid.max() == 1  # the broken files are in there, skipped


def test_packed_eval_covers_every_image_once_with_the_imagefolder_pixels(hostile,
                                                                        packed_hostile):
    cfg = data_cfg()
    folder, packs = imagefolder.scan(str(hostile)), imagefolder.scan(str(packed_hostile))

    def by_index(split):
        out = {}
        for batch in pipeline.eval_batches(split, cfg, global_batch=8):
            for i, image, valid in zip(batch["index"], batch["image"], batch["valid"],
                                       strict=True):
                if i >= 0:
                    out[int(i)] = (image, valid)
        return out

    a, b = by_index(folder), by_index(packs)
    assert sorted(a) == sorted(b) == list(range(len(folder.files)))
    for i in a:
        np.testing.assert_array_equal(a[i][0], b[i][0])
        assert a[i][1] == b[i][1]


def test_skip_warnings_name_the_same_files(hostile, packed_hostile, monkeypatch):
    warned = {}
    for name, root in (("folder", hostile), ("packed", packed_hostile)):
        split = imagefolder.scan(str(root))
        messages = []
        monkeypatch.setattr(logging, "warning", lambda msg, *a, m=messages: m.append(msg % a))
        warn = pipeline.SkipWarner(split)
        for batch in batches(split, data_cfg(), steps=5):  # 40 rows: every file once
            warn(batch)
        warned[name] = sorted(m.split(" ")[3].removeprefix(str(root) + "/") for m in messages)
    assert warned["folder"] == warned["packed"] == ["a/img001.png", "b/img002.png",
                                                    "c/img003.png"]


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", ["global", "blocks"])
def test_training_on_packed_digits_gives_the_same_losses(digits, tmp_path, shuffle):
    losses = {}
    for fmt in ("folder", "packed"):
        data = digits
        if fmt == "packed":
            data = tmp_path / "packed"
            for split in ("train", "val"):
                packing.pack(str(digits / split), str(data / split), shard_mb=0.02)
        config = load_config("tiny", data__train_dir=str(data / "train"),
                             data__val_dir=str(data / "val"), data__image_size=8,
                             total_steps=8, batch_size=32, eval_every=8, data__shuffle=shuffle)
        result = train.run(config, str(tmp_path / fmt))
        losses[fmt] = (read_losses(tmp_path / fmt), result["eval/accuracy"])
    assert len(losses["folder"][0]) == 8
    assert losses["folder"] == losses["packed"]
    # the evaluate command takes a packed --data_dir as it takes the ImageFolder
    from vitpod import evaluate, inference

    classifier = inference.load(str(tmp_path / "folder"))
    on_folder = evaluate.evaluate_classifier(classifier, str(digits / "val"), 64)
    on_packed = evaluate.evaluate_classifier(classifier, str(tmp_path / "packed" / "val"),
                                             64)
    assert on_folder["count"] == on_packed["count"] == 360
    assert on_folder["accuracy"] == on_packed["accuracy"] == losses["folder"][1]
    assert on_folder["loss"] == pytest.approx(on_packed["loss"], rel=1e-6)  # summed in
    # another order: the packed split is read in pack order


def test_pack_refuses_a_destination_holding_something_else(hostile, packed_hostile, tmp_path):
    other = make_imagefolder(tmp_path / "other", {"x": 3, "y": 3})
    with pytest.raises(UserError, match=r"holds another packed dataset \(39 images"):
        packing.pack(str(other), str(packed_hostile))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"busy is not empty \(it holds notes.txt"):
        packing.pack(str(other), str(tmp_path / "busy"))
    with pytest.raises(UserError, match="already a packed dataset"):
        packing.pack(str(packed_hostile), str(tmp_path / "again"))


def test_an_interrupted_pack_resumes_and_keeps_the_shards_it_wrote(hostile, packed_hostile,
                                                                    tmp_path, monkeypatch):
    dst = tmp_path / "resumed"
    real_write = packing._write_shard

    def fail_on_the_last_shard(split, plan, k, dst, progress):
        if k == len(plan["shards"]) - 1:
            raise KeyboardInterrupt
        real_write(split, plan, k, dst, progress)

    monkeypatch.setattr(packing, "_write_shard", fail_on_the_last_shard)
    monkeypatch.setattr(storage, "parallel_map", lambda fn, items, threads=1: list(map(fn, items)))
    with pytest.raises(KeyboardInterrupt):
        packing.pack(str(hostile), str(dst), shard_mb=0.002)
    assert not packed.is_packed(str(dst))
    written = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.arrayrecord")}
    shards = len(json.loads((packed_hostile / packed.INDEX).read_text())["shards"])
    assert len(written) == shards - 1 >= 1
    monkeypatch.setattr(packing, "_write_shard", real_write)
    counts = packing.pack(str(hostile), str(dst), shard_mb=0.002)
    assert counts["already there"] == shards - 1 and packed.is_packed(str(dst))
    assert all((dst / n).stat().st_mtime_ns == t for n, t in written.items())
    for name in json.loads((dst / packed.INDEX).read_text())["shards"]:
        assert (dst / name).read_bytes() == (packed_hostile / name).read_bytes()


@pytest.mark.slow
def test_packed_data_in_a_bucket_reads_a_run_per_request_through_faults(gcs, digits):
    gcs.create_bucket("vitpod-packed")
    dst = "gs://vitpod-packed/digits/train"
    packing.pack(str(digits / "train"), dst, shard_mb=0.05)  # written locally, uploaded
    folder, split = imagefolder.scan(str(digits / "train")), imagefolder.scan(dst)
    assert len(split.shards) > 1
    cfg = data_cfg(shuffle="blocks", image_size=8, read_threads=4)
    steps, batch = 24, 64  # a little over one epoch of 1,437 images
    expected = batches(folder, cfg, steps=steps, batch=batch)

    def read_and_compare():
        packed._readers.clear()  # a fresh process's readers: shard opens counted too
        for x, y in zip(expected, batches(split, cfg, steps=steps, batch=batch), strict=True):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["valid"], y["valid"])

    gcs.faults.reset()
    read_and_compare()
    assert gcs.faults.counts["read"] <= steps * batch / 16
    gcs.faults.reset()
    gcs.faults.latency_ms, gcs.faults.rate = (5.0, 40.0), 0.05  # slow, with 503s and drops
    read_and_compare()
    assert gcs.faults.counts["injected"] > 0
    gcs.faults.reset()
    gcs.faults.max_rate = 20.0  # a bucket that has not ramped up: 429s, retried
    read_and_compare()
    assert gcs.faults.counts["429"] > 0


@pytest.mark.slow
def test_an_imagefolder_in_a_bucket_rides_out_429s_too(gcs, colors):
    gcs.create_bucket("vitpod-throttled")
    upload.upload_tree(str(colors / "train"), "gs://vitpod-throttled/train")
    cfg = data_cfg(read_threads=8)
    expected = batches(imagefolder.scan(str(colors / "train")), cfg, steps=4, batch=16)
    split = imagefolder.scan("gs://vitpod-throttled/train")
    gcs.faults.reset()
    gcs.faults.max_rate = 20.0
    for x, y in zip(expected, batches(split, cfg, steps=4, batch=16), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["valid"], y["valid"])
    assert gcs.faults.counts["429"] > 0

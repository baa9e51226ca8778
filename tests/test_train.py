"""Whole runs: determinism, exact resume, exact eval, finished runs, refused workdirs."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_config, make_imagefolder, read_losses, read_params
from vitpod import model, train
from vitpod.data import imagefolder, transforms
from vitpod.errors import UserError


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, colors):
    config = load_config("tiny", data__train_dir=str(colors / "train"),
                         data__val_dir=str(colors / "val"))
    workdir = tmp_path_factory.mktemp("uninterrupted")
    final = train.run(config, str(workdir))
    return workdir, final


def test_same_config_and_seed_give_identicalread_losses(tiny, tmp_path, uninterrupted):
    train.run(tiny(), str(tmp_path))
    first = read_losses(uninterrupted[0])
    assert len(first) == 6 and first[6] < first[1]
    assert read_losses(tmp_path) == first


def test_resume_matches_uninterrupted_run(tiny, tmp_path, uninterrupted):
    paused = train.run(tiny(), str(tmp_path), stop_after=4)
    assert paused["step"] == 4 and not (tmp_path / "DONE").exists()
    train.run(tiny(), str(tmp_path))
    assert read_losses(tmp_path) == read_losses(uninterrupted[0])
    for a, b in zip(jax.tree.leaves(read_params(tmp_path, 6)),
                    jax.tree.leaves(read_params(uninterrupted[0], 6)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_profiling_traces_steps_without_changing_them_and_rows_report_data_wait(
        tiny, tmp_path, uninterrupted):
    train.run(tiny(), str(tmp_path), profile="3:2")
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert read_losses(tmp_path) == read_losses(uninterrupted[0])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    waits = [r["train/data_wait"] for r in rows if "train/loss" in r]
    assert len(waits) == 6 and all(0 <= w <= 1 for w in waits)
    with pytest.raises(UserError, match="--profile='3': write START:COUNT"):
        train.run(tiny(), str(tmp_path / "other"), profile="3")


def test_eval_counts_every_image_once_and_matches_a_direct_evaluation(tiny, uninterrupted):
    workdir, final = uninterrupted
    val = imagefolder.scan(str(tiny().data.val_dir), "val")
    assert final["eval/count"] == len(val.files) == 37  # 37 divides neither 16 nor 8
    config = tiny()
    graphdef, _ = model.abstract_model(config.model, config.data.image_size, 4)
    params = read_params(workdir, 6)
    images = np.stack([transforms.eval_transform(Image.open(val.path(i)).convert("RGB"),
                                                 config.data.image_size, 1.0)
                       for i in range(len(val.files))])
    logits = np.asarray(model.apply(graphdef, params, (images / 255.0 - 0.5) / 0.5))
    labels = np.array(val.labels)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert final["eval/accuracy"] == pytest.approx((logits.argmax(-1) == labels).mean(), abs=1e-6)
    assert final["eval/loss"] == pytest.approx(-log_probs[np.arange(37), labels].mean(), rel=1e-5)


def test_a_finished_run_returns_at_once_without_training(tiny, uninterrupted):
    workdir, final = uninterrupted
    before = (workdir / "metrics.jsonl").read_text()
    assert train.run(tiny(), str(workdir)) == final
    assert (workdir / "metrics.jsonl").read_text() == before


def test_a_run_stopped_after_its_last_checkpoint_finishes_without_training(
        tiny, uninterrupted, tmp_path):
    workdir, final = uninterrupted
    shutil.copytree(workdir, tmp_path / "run")
    (tmp_path / "run" / "DONE").unlink()  # as if killed between the last save and DONE
    assert train.run(tiny(), str(tmp_path / "run"))["eval/accuracy"] == final["eval/accuracy"]
    assert (tmp_path / "run" / "DONE").exists()
    assert read_losses(tmp_path / "run") == read_losses(workdir)


def test_workdir_with_a_different_config_is_refused_naming_the_keys(tiny, tmp_path):
    train.run(tiny(), str(tmp_path), stop_after=1)
    with pytest.raises(UserError, match=r"different config \(optim.lr, seed\)"):
        train.run(tiny(optim__lr=0.5, seed=7), str(tmp_path))
    # Keys that change no numbers (logging, eval, saving cadence) may change on resume.
    train.run(tiny(log_every=2, eval_every=3, save_every=2), str(tmp_path), stop_after=2)


def test_too_many_unreadable_images_stop_the_run(tmp_path, tiny):
    root = make_imagefolder(tmp_path / "data", {"a": 8, "b": 8})
    for i in range(4):
        (root / "a" / f"img{i:03d}.png").write_bytes(b"broken")
    with pytest.raises(UserError, match="unreadable.*max_skipped_fraction"):
        train.run(tiny(data__train_dir=str(root), data__val_dir=""), str(tmp_path / "run"))


def test_a_few_unreadable_images_are_skipped_and_counted(tmp_path, tiny):
    root = make_imagefolder(tmp_path / "data", {"a": 8, "b": 8})
    (root / "b" / "img003.png").write_bytes(b"")
    config = tiny(data__train_dir=str(root), data__val_dir="", data__max_skipped_fraction=0.2)
    final = train.run(config, str(tmp_path / "run"))
    assert final["train/skipped"] == 6  # 6 steps x 16 = 6 epochs of 16: the file each epoch


def test_batch_size_the_devices_do_not_divide_is_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="batch_size=12 is not divisible by the 8 devices"):
        train.run(tiny(batch_size=12), str(tmp_path))
    with pytest.raises(UserError, match="grad_accum_steps=3 does not divide the 2 rows each"):
        train.run(tiny(grad_accum_steps=3), str(tmp_path))


def test_an_fsdp_run_resumes_from_its_sharded_checkpoint(tiny, tmp_path, uninterrupted):
    """fsdp=8 with an EMA: stop at 4, resume from the sharded checkpoint, end as the
    uninterrupted fsdp run does; its params match the data-parallel run's."""
    config = lambda: tiny(mesh__data=1, mesh__fsdp=8, optim__ema_decay=0.5)  # noqa: E731
    whole = tmp_path / "whole"
    train.run(config(), str(whole))
    paused = tmp_path / "paused"
    train.run(config(), str(paused), stop_after=4)
    train.run(config(), str(paused))
    assert read_losses(paused) == read_losses(whole)
    for a, b in zip(jax.tree.leaves(read_params(paused, 6)),
                    jax.tree.leaves(read_params(whole, 6)), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(list(read_losses(whole).values()),
                               list(read_losses(uninterrupted[0]).values()), rtol=1e-5)

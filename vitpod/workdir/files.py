"""A run's workdir before training: refuse a workdir of another run, record this run's config
and manifest, and point JAX's persistent compile cache into it."""

import json
import os

import jax
import ml_collections
from absl import logging

from vitpod import config_record, storage
from vitpod.data import imagefolder
from vitpod.errors import UserError
from vitpod.formats.common import ARCH_KEYS

CONFIG_REMEDY = ("delete it and relaunch with the run's own flags: it is written again from "
                 "them (a different config then goes unnoticed)")
CONFIG_SHAPE = {"batch_size": int, "total_steps": int, "data": dict, "optim": dict,
                "model": {"variant": str, "init_from?": str},
                f"{config_record.CLASSES_KEY}?": [str]}


def read_config(workdir: str) -> dict | None:
    """The workdir's config.json (UserError if damaged), or None when it has none."""
    path = storage.join(workdir, "config.json")
    return storage.read_json(path, CONFIG_REMEDY, CONFIG_SHAPE) if storage.exists(path) else None


def record_run(config: ml_collections.ConfigDict, workdir: str, manifest_path: str) -> None:
    """Refuse a workdir whose run computed different numbers, or whose data now gives other
    labels; else record this run's config, its classes and its manifest (the data scanned
    once per run, reused on resume). Nothing is written until the data scanned cleanly, so a
    mistyped data dir leaves the workdir as it was."""
    path = storage.join(workdir, "config.json")
    recorded = read_config(workdir)
    if recorded is not None:
        changed = config_record.changed_result_keys(recorded, config)
        if changed:
            raise UserError(
                f"workdir {workdir!r} holds a run with a different config ({', '.join(changed)}"
                "); resume with the same values, or use a new --workdir")
    scanned = not storage.exists(manifest_path)
    if scanned:
        splits = imagefolder.scan_splits(config.data.train_dir, config.data.val_dir)
    else:
        splits = imagefolder.load(manifest_path)
        _warn_new_classes(splits["train"])
    classes = list(splits["train"].classes)
    trained = (recorded or {}).get(config_record.CLASSES_KEY)
    if trained is not None and trained != classes:
        raise UserError(_other_labels(path, trained, classes))
    if recorded is None:
        storage.makedirs(workdir)
        storage.write_text(path, config_record.to_json(config, classes))
    elif trained is None:  # a workdir from before classes were recorded: record them now
        storage.write_text(path, json.dumps({**recorded, config_record.CLASSES_KEY: classes},
                                            indent=2, sort_keys=True))
    if scanned:
        imagefolder.save(manifest_path, splits)


def _other_labels(path: str, trained: list[str], found: list[str]) -> str:
    only_data = sorted(set(found) - set(trained))
    only_run = sorted(set(trained) - set(found))
    which = (f"only in the data {only_data or '-'}, only in the run {only_run or '-'}"
             if only_data or only_run else "the same classes in another order")
    return (f"the train data gives other labels than this run was trained with ({path}): "
            f"{which}; its checkpoints hold those labels, so put the data's class folders back "
            "as they were, or train on this data with a new --workdir")


def _warn_new_classes(train: imagefolder.Split) -> None:
    """One warning naming class folders added to an ImageFolder since the run's manifest was
    made: they stay out of the run, whose labels are fixed."""
    if train.shards or not storage.isdir(train.root):
        return
    added = [c for c in storage.subdirs(train.root)
             if not c.startswith(".") and c not in set(train.classes)]
    if added:
        logging.warning("data dir %s: class folder(s) %s are not in this run's manifest and are "
                        "left out: a run keeps the classes of its first launch (train them in a "
                        "new run, with a new --workdir)", train.root, ", ".join(added))


def check_finished(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
    """UserError when the finished run in `workdir` was trained with other values than
    `config` (result keys only): relaunching it would not train those values."""
    recorded = read_config(workdir)
    differ = config_record.result_differences(recorded, config) if recorded else {}
    if differ:
        values = "; ".join(f"{k}={old!r}, not {new!r}" for k, (old, new) in
                           list(differ.items())[:4]) + ("; ..." if len(differ) > 4 else "")
        raise UserError(
            f"the run in {workdir} finished at step {step} with other values than this "
            f"command's ({values}); "
            "a finished run trains no further, not to a larger total_steps either (its "
            "schedule ended): relaunch with its own values to see its result, or start a new "
            f"run with a new --workdir (from its weights: python -m vitpod.export "
            f"--workdir={workdir} --out=DIR, then --config.model.init_from=DIR)")


def recorded_architecture(workdir: str, init_from: str) -> dict | None:
    """The model keys this workdir's run adopted from `init_from` at its first launch (its
    config.json is written after adopting), or None if it recorded none from that checkpoint.
    A resume takes the architecture from here instead of reading the checkpoint again."""
    recorded = read_config(workdir)
    model_cfg = (recorded or {}).get("model", {})
    if model_cfg.get("init_from") != init_from:
        return None
    return {k: model_cfg[k] for k in ARCH_KEYS if k in model_cfg} or None


def enable_compile_cache(wanted: bool, workdir: str) -> None:
    """JAX's persistent cache in the workdir when `wanted` (config.compile_cache) and not set
    already (env or a shared dir). JAX opens its cache once per process, at the first compile
    after this."""
    if wanted and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          storage.join(storage.absolute(workdir), "compile_cache"))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            # Every program, not only those over JAX's 1 s default: a relaunch also compiles
            # the initialiser, restore and eval programs.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

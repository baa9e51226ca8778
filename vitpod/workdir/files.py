"""A run's workdir before training: refuse a workdir of another run, record this run's config
and manifest, and point JAX's persistent compile cache into it."""

import os

import jax
import ml_collections

from vitpod import config as config_lib
from vitpod import storage
from vitpod.data import imagefolder
from vitpod.errors import UserError
from vitpod.formats.common import ARCH_KEYS

CONFIG_REMEDY = ("delete it and relaunch with the run's own flags: it is written again from "
                 "them (a different config then goes unnoticed)")


def record_run(config: ml_collections.ConfigDict, workdir: str, manifest_path: str):
    """Refuse a workdir whose run computed different numbers; else record this run's config
    and its manifest (the data scanned once per run, reused on resume). Nothing is written
    until the data scanned cleanly, so a mistyped data dir leaves the workdir as it was."""
    path = storage.join(workdir, "config.json")
    recorded = storage.exists(path)
    if recorded:
        changed = config_lib.changed_result_keys(storage.read_json(path, CONFIG_REMEDY), config)
        if changed:
            raise UserError(
                f"workdir {workdir!r} holds a run with a different config ({', '.join(changed)}"
                "); resume with the same values, or use a new --workdir")
    splits = None
    if not storage.exists(manifest_path):
        splits = imagefolder.scan_splits(config.data.train_dir, config.data.val_dir)
    if not recorded:
        storage.makedirs(workdir)
        storage.write_text(path, config_lib.to_json(config))
    if splits is not None:
        imagefolder.save(manifest_path, splits)


def recorded_architecture(workdir: str, init_from: str) -> dict | None:
    """The model keys this workdir's run adopted from `init_from` at its first launch (its
    config.json is written after adopting), or None if it recorded none from that checkpoint.
    A resume takes the architecture from here instead of reading the checkpoint again."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        return None
    model_cfg = storage.read_json(path, CONFIG_REMEDY).get("model", {})
    if model_cfg.get("init_from") != init_from:
        return None
    return {k: model_cfg[k] for k in ARCH_KEYS if k in model_cfg} or None


def enable_compile_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
    """JAX's persistent cache in the workdir, unless off or already set (env or a shared dir).
    JAX opens its cache once per process, at the first compile after this."""
    if config.compile_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          storage.join(storage.absolute(workdir), "compile_cache"))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            # Every program, not only those over JAX's 1 s default: a relaunch also compiles
            # the initialiser, restore and eval programs.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

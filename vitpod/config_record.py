"""config.json: a run's config as its workdir records it (with the train classes in label
order), read back for a resume or an export, and compared with a relaunch's."""

import json

import ml_collections

from vitpod import config as config_lib

# config.json holds, beside the config, the train classes in label order, as the first launch
# found them: a manifest scanned again must give the same (workdir/files.py).
CLASSES_KEY = "classes"


def to_json(config: ml_collections.ConfigDict, classes: list[str] | None = None) -> str:
    """config.json's text: the config, and the run's classes when given."""
    recorded = {**config.to_dict(), **({CLASSES_KEY: classes} if classes is not None else {})}
    return json.dumps(recorded, indent=2, sort_keys=True, default=list)


# Keys added after runs were already written, with the value that reproduces those runs.
ADDED_KEYS = {"data.reduced_decode": False, "data.shuffle": "global",
              "data.shuffle_block": 32, "data.shuffle_window": 1024, "model.gelu": "exact",
              "data.eval_interpolation": "bilinear"}


def from_json(saved: dict) -> ml_collections.ConfigDict:
    """A workdir's config.json back as a ConfigDict (keys it predates at their old value)."""
    config = config_lib.defaults()
    flat = {**ADDED_KEYS, **_flatten(saved)}
    flat.pop(CLASSES_KEY, None)
    config.update_from_flattened_dict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()})
    return config


def changed_result_keys(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Dotted keys whose values differ and would change the run's numbers."""
    return list(result_differences(saved, current))


def result_differences(saved: dict, current: ml_collections.ConfigDict) -> dict:
    """{dotted key: (saved value, current value)} of the keys that change the run's numbers."""
    now = json.loads(to_json(current))
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    flat_saved.pop(CLASSES_KEY, None)
    keys = sorted(set(flat_saved) | set(flat_now))
    return {k: (flat_saved.get(k, ADDED_KEYS.get(k)), flat_now.get(k)) for k in keys
            if k not in config_lib.RESULT_NEUTRAL_KEYS
            and flat_saved.get(k, ADDED_KEYS.get(k)) != flat_now.get(k)}


def missing_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The keys of defaults() that `config` lacks (a config file not built from them)."""
    return sorted(set(_flatten(config_lib.defaults().to_dict())) - set(_flatten(config.to_dict())))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

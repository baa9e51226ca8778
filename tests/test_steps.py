"""The shard_map steps on 8 devices compute what one device computes."""

import jax
import numpy as np

from tests.conftest import assert_params_close, key_names, load_config
from vitpod import model, optim, steps


def _mesh(n):
    return jax.make_mesh((n, 1), ("data", "fsdp"), devices=jax.devices()[:n])


def _batch(mesh, n=16, size=8, seed=0, valid=None):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, n).astype(np.int32),
             "valid": np.ones(n, np.float32) if valid is None else valid}
    return {k: jax.device_put(v, steps.batch_sharding(mesh)) for k, v in batch.items()}


def _train(num_devices, config, num_steps=3, valid=None, pack=None, accum=1):
    mesh = _mesh(num_devices)
    tx = optim.make(config.optim, 10)
    state = steps.state_initializer(config, 5, tx, mesh)(None)
    graphdef, _ = model.abstract_model(config.model, 8, 5)
    config.grad_accum_steps = accum
    train_step = steps.make_train_step(graphdef, tx, mesh, config, pack=pack)
    losses = []
    for _ in range(num_steps):
        state, metrics = train_step(state, _batch(mesh, valid=valid))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


def test_unpacked_gradient_sum_matches_1_device():
    """The TPU path (one psum per leaf, no packing); other layouts: test_parallel.py."""
    config = load_config("tiny", optim__warmup_steps=0)
    valid = np.array([1, 0, 1, 1] * 4, np.float32)
    losses_1, params_1 = _train(1, config, valid=valid)
    losses_8, params_8 = _train(8, config, valid=valid, pack=False)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    assert losses_1[-1] < losses_1[0]  # the steps really moved the params
    assert_params_close(params_1, params_8)


def test_eval_step_sums_only_valid_rows():
    """Loss, top-1, top-5 and per-class sums, over the valid rows only; 9 classes so that
    top-5 is not every row."""
    config = load_config("tiny")
    mesh = _mesh(8)
    tx = optim.make(config.optim, 10)
    params = steps.state_initializer(config, 9, tx, mesh)(None)["params"]
    head = params["head"]["kernel"]  # zeros at init: every class would tie
    params["head"]["kernel"] = jax.device_put(
        np.random.default_rng(1).normal(size=head.shape).astype(np.float32), head.sharding)
    graphdef, _ = model.abstract_model(config.model, 8, 9)
    valid = np.array([1, 1, 0] * 5 + [1], np.float32)
    out = steps.make_eval_step(graphdef, mesh, config.data)(params, _batch(mesh, valid=valid))
    host = {k: np.asarray(v) for k, v in _batch(_mesh(1)).items()}
    x = (host["image"] / 255.0 - 0.5) / 0.5
    logits = np.asarray(model.apply(graphdef, jax.device_get(params), x))
    keep, labels = valid == 1, host["label"]
    hits = logits.argmax(-1) == labels
    assert float(out["count"]) == keep.sum()
    assert float(out["correct"]) == hits[keep].sum()
    top5 = (logits > logits[np.arange(16), labels][:, None]).sum(-1) < 5
    assert 0 < top5[keep].sum() < keep.sum()  # the check below can tell top-5 from all rows
    assert float(out["top5"]) == top5[keep].sum()
    np.testing.assert_array_equal(out["class_count"], np.bincount(labels[keep], minlength=9))
    np.testing.assert_array_equal(out["class_correct"],
                                  np.bincount(labels[keep & hits], minlength=9))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_probs[np.arange(16), labels][keep].sum()
    np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-5)


def test_weight_decay_applies_to_kernels_only():
    config = load_config("tiny")
    _, params = model.abstract_model(config.model, 8, 5)
    mask = optim.decay_mask(params)
    flat = {"/".join(key_names(path)): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["blocks/0/attn/query/kernel"] and flat["patch_embed/kernel"]
    assert not flat["blocks/0/attn/query/bias"] and not flat["pos_embed"]
    assert not flat["blocks/0/norm1/scale"] and not flat["head/bias"]

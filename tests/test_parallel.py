"""Mesh layouts: data parallel, FSDP (ZeRO-3), both, with accumulation and bfloat16,
against one device; the collectives and per-device state bytes against the theory.

The layouts train with every random regulariser on (dropout, stochastic depth, mixup,
CutMix, label smoothing): their randomness is keyed by (seed, step, global row), so it too
must not depend on the layout."""

import jax
import numpy as np
import pytest

from tests.conftest import assert_params_close, load_config
from vitpod import model, optim, parallel, steps
from vitpod.planning.hlo import collective_bytes


def _mesh(data, fsdp):
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), devices=jax.devices()[:data * fsdp])


def _batches(num_steps, n=32, size=8):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, n).astype(np.int32),
             "valid": np.array([1, 1, 1, 0] * (n // 4), np.float32)} for _ in range(num_steps)]


def _setup(config, data, fsdp):
    mesh = _mesh(data, fsdp)
    tx = optim.make(config.optim, 10)
    state = steps.state_initializer(config, 5, tx, mesh)(None)
    graphdef, _ = model.abstract_model(config.model, 8, 5)
    return mesh, state, steps.make_train_step(graphdef, tx, mesh, config)


def _train(config, data, fsdp, num_steps=3):
    mesh, state, train_step = _setup(config, data, fsdp)
    losses, grad_norms = [], []
    for batch in _batches(num_steps):
        state, metrics = train_step(state, jax.device_put(batch, steps.batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return losses, state, grad_norms


REGULARISED = {"model__dropout": 0.1, "model__drop_path": 0.2, "mix__mixup_alpha": 0.8,
               "mix__cutmix_alpha": 1.0, "label_smoothing": 0.1}


def _config(**overrides):
    return load_config("tiny", optim__warmup_steps=0, batch_size=32, **overrides)


@pytest.fixture(scope="module")
def reference():
    losses, state, grad_norms = _train(_config(**REGULARISED), 1, 1)
    return losses, jax.device_get(state["params"]), grad_norms


def test_the_regularisers_change_the_step(reference):
    losses, _, _ = _train(_config(), 1, 1)
    assert not np.allclose(losses, reference[0], rtol=1e-3)


@pytest.mark.parametrize("data,fsdp,accum,blocks", [
    (8, 1, 1, {}), (1, 8, 1, {}), (2, 4, 1, {}), (2, 4, 2, {}),
    (1, 8, 1, {"model__scan_layers": False, "model__remat": "full"})])
def test_every_layout_trains_as_one_device(reference, data, fsdp, accum, blocks):
    """The one-device reference runs its blocks unrolled (the default without FSDP or
    remat), FSDP layouts as one scan; the last case unrolled, FSDP and remat together."""
    losses, state, grad_norms = _train(_config(grad_accum_steps=accum, **REGULARISED,
                                               **blocks), data, fsdp)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    np.testing.assert_allclose(grad_norms, reference[2], rtol=1e-5)
    assert_params_close(reference[1], jax.device_get(state["params"]))
    kernel = state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    if fsdp > 1:  # stored as shards: each device holds 1/fsdp of the big weights
        assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // fsdp
        moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == kernel.shape]
        assert len(moments) == 4  # Adam's mu and nu of both blocks' fc1
        assert all(m.sharding.spec == kernel.sharding.spec for m in moments)


def test_blocks_scan_by_default_only_with_fsdp_or_remat():
    loops = {}
    for fsdp, remat in ((1, "none"), (8, "none"), (1, "dots")):
        compiled, _ = _compiled(_config(model__remat=remat), 8 // fsdp, fsdp)
        loops[fsdp, remat] = " while(" in compiled.as_text()
    assert loops == {(1, "none"): False, (8, "none"): True, (1, "dots"): True}


def test_bfloat16_matmuls_stay_close_to_float32(reference):
    """bf16 activations and matmuls (f32 params, loss and softmax), on data=2 x fsdp=4:
    losses and gradient norms within 2 % of the f32 run's over 3 steps. Params are not
    compared elementwise: Adam turns bf16 noise on near-zero gradients into lr-sized steps."""
    losses, state, grad_norms = _train(_config(model__dtype="bfloat16", **REGULARISED), 2, 4)
    np.testing.assert_allclose(losses, reference[0], rtol=2e-2)
    np.testing.assert_allclose(grad_norms, reference[2], rtol=2e-2)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
    assert not np.allclose(losses, reference[0], rtol=1e-6)  # it did run in bf16


def _compiled(config, data, fsdp):
    mesh, state, train_step = _setup(config, data, fsdp)
    batch = jax.device_put(_batches(1)[0], steps.batch_sharding(mesh))
    return train_step.lower(state, batch).compile(), state


def _split_bytes(params, fsdp):
    specs = parallel.param_specs(params, fsdp)
    sizes = [(x.size * x.dtype.itemsize, parallel.is_sharded(s))
             for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs), strict=True)]
    return sum(b for b, s in sizes if s), sum(b for b, s in sizes if not s)


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (True, "full")])
def test_fsdp_collectives_match_the_theory(scan, remat):
    """fsdp=8: each sharded param is all-gathered once per step (the blocks' twice under
    remat, whose backward gathers again instead of keeping the weights) and its gradient
    reduce-scattered once; the replicated rest is all-reduced with the metric sums. A scan's
    body counts once per layer."""
    config = _config(model__scan_layers=scan, model__remat=remat)
    compiled, state = _compiled(config, 1, 8)
    sent = collective_bytes(compiled.as_text())
    params = jax.device_get(state["params"])
    sharded, replicated = _split_bytes(params, 8)
    blocks_sharded, _ = _split_bytes(params["blocks"], 8)
    gathered = sharded + (blocks_sharded if remat != "none" else 0)
    assert sent["all-gather"] == pytest.approx(gathered, rel=0.05)
    assert sent["reduce-scatter"] == pytest.approx(sharded / 8, rel=0.05)
    assert sent["all-reduce"] == pytest.approx(replicated, rel=0.05, abs=64)


def test_state_bytes_per_device_fall_as_one_over_fsdp():
    config = _config()
    state_bytes = {}
    for fsdp in (1, 2, 4, 8):
        compiled, state = _compiled(config, 8 // fsdp, fsdp)
        batch_bytes = 32 // 8 * (8 * 8 * 3 + 4 + 4)
        state_bytes[fsdp] = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    params = jax.device_get(state["params"])
    whole = state_bytes[1]
    for fsdp in (2, 4, 8):
        sharded, replicated = _split_bytes(params, fsdp)
        fraction = (sharded / fsdp + replicated) / (sharded + replicated)
        assert state_bytes[fsdp] == pytest.approx(whole * fraction, rel=0.05)
        assert state_bytes[fsdp] < state_bytes[fsdp // 2]

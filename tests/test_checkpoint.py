"""vitpod/checkpoint.py on its own: async saves of a sharded state, the newest restored exactly
into the shardings asked for, damaged checkpoints skipped and moved aside, none restorable
refused in one line, and the params read back on one host."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitpod import checkpoint
from vitpod.errors import UserError


def _state(step: int, mesh):
    sharded = NamedSharding(mesh, P("data"))
    params = {"w": jnp.arange(16, dtype=jnp.float32) * step, "blocks": {0: jnp.ones(8) * step}}
    return {"step": jnp.int32(step), "params": jax.device_put(params, sharded)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


@pytest.fixture
def saved(tmp_path):
    """Checkpoints of steps 2, 4 and 6 (keep 3) of a state sharded over 8 devices."""
    mesh = jax.make_mesh((8,), ("data",))
    mngr = checkpoint.manager(str(tmp_path / "ckpt"), keep=3)
    for step in (2, 4, 6):
        checkpoint.save(mngr, step, _state(step, mesh))
    mngr.wait_until_finished()
    return mngr, _state(0, mesh)


def _damage(mngr, step):
    for path in pathlib.Path(mngr.directory, str(step)).rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def test_the_newest_checkpoint_is_restored_exactly_in_the_asked_shardings(saved):
    mngr, template = saved
    assert checkpoint.listed(str(mngr.directory)) == [2, 4, 6]
    step, state = checkpoint.restore_latest(mngr, _abstract(template))
    assert step == 6 and int(state["step"]) == 6
    np.testing.assert_array_equal(state["params"]["w"], np.arange(16) * 6.0)
    assert state["params"]["w"].sharding == template["params"]["w"].sharding


def test_a_damaged_newest_checkpoint_is_skipped_and_moved_aside(saved):
    mngr, template = saved
    _damage(mngr, 6)
    step, state = checkpoint.restore_latest(mngr, _abstract(template))
    assert step == 4 and int(state["step"]) == 4
    assert (mngr.directory / "6.unreadable").is_dir() and 6 not in mngr.all_steps()


def test_no_restorable_checkpoint_is_one_line_and_moves_nothing(saved):
    mngr, template = saved
    for step in (2, 4, 6):
        _damage(mngr, step)
    with pytest.raises(UserError, match=r"no checkpoint in .* restores: 6, 4, 2 damaged"):
        checkpoint.restore_latest(mngr, _abstract(template))
    assert checkpoint.listed(str(mngr.directory)) == [2, 4, 6]


def test_params_are_read_back_on_one_host_with_their_integer_keys(saved):
    mngr, _ = saved
    mngr.close()
    step, params = checkpoint.load_params(str(mngr.directory), 4)
    assert step == 4 and set(params) == {"w", "blocks"} and list(params["blocks"]) == [0]
    np.testing.assert_array_equal(params["blocks"][0], np.full(8, 4.0))
    assert checkpoint.load_params(str(mngr.directory))[0] == 6

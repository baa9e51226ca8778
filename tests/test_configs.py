"""Every config file loads, validates on 8 devices, and builds its model abstractly."""

import pathlib

import jax
import pytest

from tests.conftest import ROOT, load_config
from vitpod import config as config_lib
from vitpod import model, optim

NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_and_builds_its_model(name):
    config = load_config(name, data__train_dir="unused")
    assert config.is_locked
    assert pathlib.Path(ROOT / "configs" / f"{name}.py").read_text().lstrip().startswith('"""')
    config_lib.validate(config, num_devices=8, num_processes=1)
    _, params = model.abstract_model(config.model, config.data.image_size, 10)
    opt_state = jax.eval_shape(optim.make(config.optim, config.total_steps).init, params)
    assert jax.tree.leaves(params) and jax.tree.leaves(opt_state)


def test_unknown_keys_cannot_be_set():
    config = load_config("demo")
    with pytest.raises(AttributeError):
        config.data.no_such_key = 1


def test_a_bad_attention_choice_is_named_in_one_line():
    config = load_config("demo", data__train_dir="unused", model__attention="flash")
    with pytest.raises(config_lib.UserError,
                       match=r"^config model.attention is 'flash': use 'auto' .* or 'xla'$"):
        config_lib.validate(config, num_devices=8, num_processes=1)

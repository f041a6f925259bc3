"""The alignment room: methods are found by their recipe value, REPA's heads are the
reference's projectors (same shapes, same initialisation as before the room existed), and
`REPAModel` carries whichever method's heads the recipe names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_recipe

from repa_eqx.alignment import METHODS, REPA, AlignmentMethod, Projector, get_method, repa_loss
from repa_eqx.core.errors import ConfigError
from repa_eqx.model import REPAModel, SiTConfig
from repa_eqx.training.recipe import RecipeError

CONFIG = SiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
    encoder_depth=1, num_classes=10,
)  # fmt: skip


def test_methods_are_registered_by_their_recipe_value():
    assert sorted(METHODS) == ["irepa", "repa"] and isinstance(get_method("repa"), REPA)
    assert all(issubclass(m, AlignmentMethod) and m.name == k for k, m in METHODS.items())
    assert get_method("irepa", kernel_size=3).kernel_size == 3
    with pytest.raises(ConfigError, match="unknown alignment method 'nope'"):
        get_method("nope")


def test_repa_heads_are_one_projector_per_encoder_with_the_split_keys():
    key = jax.random.key(3)
    heads = REPA().heads(32, (24, 16), 64, key=key)
    assert [type(h) for h in heads] == [Projector, Projector]
    keys = jax.random.split(key, 2)
    for head, z, k in zip(heads, (24, 16), keys, strict=True):
        expected = Projector(32, z, 64, key=k)
        for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    assert REPA().heads(32, (), 64, key=key) == ()


def test_repa_targets_are_the_features_and_its_loss_is_repa_loss():
    p = jax.random.normal(jax.random.key(0), (2, 5, 6))
    f = jax.random.normal(jax.random.key(1), (2, 5, 6))
    method = get_method("repa")
    assert method.targets((f,))[0] is f
    np.testing.assert_array_equal(method.loss((p,), (f,)), repa_loss((p,), (f,)))
    assert method.loss_name == "repa_loss"


@pytest.mark.standard_promotion
def test_repa_model_carries_the_methods_heads():
    model = REPAModel(CONFIG, (24,), 64, key=jax.random.key(0))
    assert isinstance(model.projectors[0], Projector)
    x, t, y = jnp.zeros((4, 8, 8)), jnp.array(0.5), jnp.array(3)
    v, (z,) = model(x, t, y)
    assert v.shape == (4, 8, 8) and z.shape == (CONFIG.num_tokens, 24)
    with pytest.raises(ConfigError, match="unknown alignment method"):
        REPAModel(CONFIG, (24,), 64, key=jax.random.key(0), alignment="nope")


def test_the_recipe_names_the_method(tmp_path):
    assert tiny_recipe(tmp_path).loss.alignment == "repa"
    with pytest.raises(RecipeError, match="'loss.alignment' must be one of \\['irepa', 'repa'\\]"):
        tiny_recipe(tmp_path, loss={"alignment": "crepa"})

import dataclasses
import json

import numpy as np
import pytest
from helpers import unchecked

from repa_eqx.core.pytree import flatten
from repa_eqx.data.datasets import load_mnist_5k
from repa_eqx.evaluation import mnist_net
from repa_eqx.evaluation.mnist_net import (
    load_mnist_net,
    mnist_accuracy,
    mnist_features,
    mnist_logits,
    split_mnist_5k,
    train_mnist_net,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding the real classifier, trained once for this module (about 15 s)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REPA_EQX_CACHE", str(root))
        net = load_mnist_net(progress=False)
    return root, net


def _leaves(net) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(net).items()}


def _quick_training(calls: list):
    """Stands in for the full training: records the call, trains for 2 steps."""

    def train(**kwargs):
        calls.append(kwargs)
        net, info = train_mnist_net(steps=2, progress=False)
        # Recorded as the real recipe, so a second load takes it from the cache.
        return net, dataclasses.replace(info, recipe=mnist_net._RECIPE)

    return train


def test_split_is_a_fixed_partition():
    train, held_out = split_mnist_5k()
    assert (len(train), len(held_out)) == (4000, 1000)
    np.testing.assert_array_equal(split_mnist_5k()[1].images, held_out.images)

    def rows(images):
        return sorted(map(bytes, images.reshape(len(images), -1)))

    assert rows(np.concatenate([train.images, held_out.images])) == rows(load_mnist_5k().images)
    assert np.bincount(held_out.labels).min() > 70  # every class is held out


@pytest.mark.standard_promotion
@pytest.mark.slow
def test_training_is_deterministic():
    a, info_a = train_mnist_net(steps=5, progress=False)
    b, info_b = train_mnist_net(steps=5, progress=False)
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    assert leaves_a.keys() == leaves_b.keys()
    for name in leaves_a:
        np.testing.assert_array_equal(leaves_a[name], leaves_b[name], err_msg=name)
    assert info_a.held_out_accuracy == info_b.held_out_accuracy
    c, _ = train_mnist_net(steps=5, seed=1, progress=False)
    assert not np.array_equal(_leaves(c)["dense/weight"], leaves_a["dense/weight"])


def test_held_out_accuracy(cache):
    root, net = cache
    _, held_out = split_mnist_5k()
    accuracy = mnist_accuracy(net, held_out.images, held_out.labels)
    assert accuracy > 0.95
    info = json.loads((root / "mnist_net" / "v1" / "info.json").read_text())
    assert info["held_out_accuracy"] == accuracy
    assert info["recipe"]["seed"] == 0 and len(info["data_sha256"]) == 64


def test_outputs(cache):
    _, net = cache
    _, held_out = split_mnist_5k()
    images = held_out.images[:123]  # not a multiple of the batch: the last batch is padded
    features = mnist_features(net, images, batch_size=50)
    logits = mnist_logits(net, images, batch_size=50)
    assert features.shape == (123, 128) and logits.shape == (123, 10)
    np.testing.assert_allclose(features, mnist_features(net, images), rtol=0, atol=1e-5)
    single = np.asarray(net(held_out.images[122]))
    np.testing.assert_allclose(logits[122], single, rtol=0, atol=1e-4)
    # Every feature varies over the digits: no dead unit to make the covariance singular.
    assert mnist_features(net, held_out.images).std(axis=0).min() > 0.05
    with unchecked(), pytest.raises(ValueError, match="uint8 images of shape"):
        mnist_features(net, images.astype(np.float32))


def test_cache_round_trip(cache, monkeypatch):
    root, net = cache
    monkeypatch.setenv("REPA_EQX_CACHE", str(root))
    calls = []
    monkeypatch.setattr(mnist_net, "train_mnist_net", _quick_training(calls))
    loaded = load_mnist_net(progress=False)
    assert calls == []
    images = split_mnist_5k()[1].images[:64]
    np.testing.assert_array_equal(mnist_features(loaded, images), mnist_features(net, images))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_json", "other_recipe"])
@pytest.mark.standard_promotion
def test_corrupt_cache_retrains(cache, tmp_path, monkeypatch, damage):
    root, _ = cache
    folder = tmp_path / "mnist_net" / "v1"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "info.json"):
        (folder / name).write_bytes((root / "mnist_net" / "v1" / name).read_bytes())
    weights, info = folder / "model.safetensors", folder / "info.json"
    if damage == "garbage":
        weights.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bad_json":
        info.write_text("{")
    else:
        record = json.loads(info.read_text())
        record["recipe"]["steps"] = 1
        info.write_text(json.dumps(record))
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(mnist_net, "train_mnist_net", _quick_training(calls))
    load_mnist_net(progress=False)
    assert len(calls) == 1
    load_mnist_net(progress=False)  # the retrained net was cached over the damaged one
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.joinpath("mnist_net").iterdir()) == ["v1"]


@pytest.mark.standard_promotion
def test_retrain_ignores_the_cache(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(mnist_net, "train_mnist_net", _quick_training(calls))
    load_mnist_net(progress=False)
    load_mnist_net(retrain=True, progress=False)
    assert len(calls) == 2

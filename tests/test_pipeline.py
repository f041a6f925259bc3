"""The grain data pipeline: batch order, per-host slicing, iterator state, the latent shards,
and training on `repa preprocess` output end to end."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest

from repa_eqx.core.pytree import flatten
from repa_eqx.data.datasets import batch_indices, load_mnist_5k
from repa_eqx.data.pipeline import Batches, EpochOrder, LatentSource, PixelSource, batch_dataset
from repa_eqx.training import train as run_training
from repa_eqx.training.recipe import parse_recipe, sit_config
from repa_eqx.training.step import StepConfig, init_state, make_optimizer, make_train_step

pytestmark = pytest.mark.standard_promotion


def test_epoch_order_is_a_fresh_permutation_per_epoch():
    order = EpochOrder(10, 3, seed=5)
    epoch0 = np.concatenate([order(s) for s in range(3)])
    epoch1 = np.concatenate([order(s) for s in range(3, 6)])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # remainder (1 example) dropped
    assert not np.array_equal(epoch0, epoch1)
    for step in range(8):  # the order runs have always used: NumPy's permutation per epoch
        epoch, i = divmod(step, 3)
        expected = np.random.default_rng([5, epoch]).permutation(10)[3 * i : 3 * i + 3]
        np.testing.assert_array_equal(order(step), expected)
        np.testing.assert_array_equal(batch_indices(step, 3, 10, 5), expected)
    assert not np.array_equal(EpochOrder(10, 3, seed=6)(0), order(0))


def test_each_host_loads_its_rows_of_the_global_batch():
    mnist = PixelSource(load_mnist_5k())
    whole = batch_dataset(mnist, batch_size=16, seed=0)
    for step in (0, 7, 400):  # 400: second epoch
        shares = [
            batch_dataset(mnist, batch_size=16, seed=0, process_index=p, process_count=4)[step]
            for p in range(4)
        ]
        assert all(len(s["y"]) == 4 for s in shares)
        np.testing.assert_array_equal(np.concatenate([s["x"] for s in shares]), whole[step]["x"])
        np.testing.assert_array_equal(np.concatenate([s["y"] for s in shares]), whole[step]["y"])


@pytest.mark.parametrize("device_prefetch", [0, 2])
def test_iterator_state_continues_exactly(device_prefetch):
    """The saved state is the next batch the loop gets, also when batches are already on
    their way to the device."""
    ds = batch_dataset(PixelSource(load_mnist_5k()), batch_size=8, seed=1)
    placed = []
    place = (lambda b: placed.append(1) or b) if device_prefetch else None
    it = Batches(ds, start=3, place=place, device_prefetch=device_prefetch)
    for _ in range(4):
        next(it)
    state = it.state()
    assert state == {"next_index": 7}
    assert len(placed) == (4 + device_prefetch if device_prefetch else 0)
    expected = [next(it)["y"] for _ in range(3)]
    again = Batches(ds)
    again.restore(state)
    for y in expected:
        np.testing.assert_array_equal(next(again)["y"], y)


def test_latent_source_reads_rows_across_shards(dataset):
    src = LatentSource(dataset)
    manifest = json.loads((dataset / "manifest.json").read_text())
    whole = {
        name: np.concatenate(
            [np.load(dataset / s["path"] / f"{name}.npy") for s in manifest["shards"]]
        )
        for name in ("moments", "images", "labels")
    }
    assert len(src) == len(whole["labels"]) == manifest["num_examples"]
    idx = np.array([len(src) - 1, 0, 9, 3, 15, 8])  # unsorted, across the three shards
    batch = src.read(idx)
    np.testing.assert_array_equal(batch["moments"], whole["moments"][idx])
    np.testing.assert_array_equal(batch["image"], whole["images"][idx])
    np.testing.assert_array_equal(batch["y"], whole["labels"][idx])
    assert "image" not in LatentSource(dataset, keep_image=False).read(idx)


def test_posterior_is_sampled_in_the_step():
    """A zero posterior std makes the latent mean * 0.18215: the step on `moments` equals the
    step on that `x` (to rounding: XLA fuses the two differently)."""
    recipe = parse_recipe(
        {
            "model": dict(arch="SiT-S/2", depth=1, hidden_size=32, num_heads=2, encoder_depth=1,
                          input_size=4, in_channels=4, num_classes=3, projector_dim=16),
            "data": {"dataset": "imagenet-latents", "path": "unused"},
        }
    )  # fmt: skip
    optimizer = make_optimizer(recipe)
    state = init_state(sit_config(recipe, 3), [], 16, optimizer, seed=0)
    arrays, static = eqx.partition(state, eqx.is_array)
    step = make_train_step(optimizer, StepConfig("linear", "uniform", 0.0, 0.9, "fp32"), static, ())
    mean = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
    y = np.array([0, 2])
    moments = np.concatenate([mean, np.zeros_like(mean)], axis=1)
    copy = jax.tree.map(lambda a: a.copy(), arrays)
    a, ma = step(arrays, {"moments": moments, "y": y}, ())
    b, mb = step(copy, {"x": mean * 0.18215, "y": y}, ())
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    flat_a, flat_b = flatten(eqx.combine(a, static)), flatten(eqx.combine(b, static))
    for name in flat_a:
        np.testing.assert_allclose(flat_a[name], flat_b[name], rtol=1e-5, atol=1e-9, err_msg=name)


@pytest.mark.slow
def test_trains_on_preprocessed_latents(dataset, vae_folder, tiny_dinov2, tmp_path):
    """`repa preprocess` output -> REPA training with the in-step DINOv2 on the stored images
    and grids decoded by a VAE."""
    recipe = parse_recipe(
        {
            "model": dict(arch="SiT-S/2", depth=2, hidden_size=32, num_heads=2, encoder_depth=1,
                          input_size=4, in_channels=4, num_classes=3, projector_dim=32),
            "encoders": [{"id": tiny_dinov2, "resolution": 28}],
            "optim": {"lr": 1e-3},
            "data": {"dataset": "imagenet-latents", "path": str(dataset), "batch_size": 4,
                     "vae": str(vae_folder)},
            "train": dict(steps=12, log_every=4, checkpoint_every=6, sample_every=12,
                          sample_steps=2, num_samples=6),
            "output": {"dir": str(tmp_path / "run")},
        }
    )  # fmt: skip
    result = run_training(recipe, progress=False)
    assert result.step == 12
    assert np.isfinite(result.last["loss"]) and -1 <= result.last["repa_loss"] <= 1
    from PIL import Image

    grid = Image.open(tmp_path / "run/samples.png")
    assert grid.mode == "RGB" and grid.size[0] >= 3 * 32
    wrong = parse_recipe(
        {
            "model": dict(arch="SiT-S/2", input_size=8, in_channels=4, num_classes=3),
            "data": {"dataset": "imagenet-latents", "path": str(dataset)},
            "output": {"dir": str(tmp_path / "wrong")},
        }
    )
    with pytest.raises(ValueError, match=r"do not match the latents \(4, 4, 4\)"):
        run_training(wrong, progress=False)

"""The pixel data sets shipped inside wheels: photo-crops (scikit-image's photographs) is
deterministic, labelled by photograph, made of windows of the resized photographs, and trains
and evaluates like MNIST-5k."""

import importlib.util
import math
from dataclasses import replace

import numpy as np
import pytest
from helpers import eval_recipe
from PIL import Image

from repa_eqx.data import datasets
from repa_eqx.data.datasets import (
    PHOTOS,
    DataError,
    load_photo_crops,
    load_pixel_dataset,
    photo_file,
)
from repa_eqx.training.loop import train
from repa_eqx.training.metrics_log import read_metrics
from repa_eqx.training.recipe import RecipeError

pytestmark = pytest.mark.standard_promotion

needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None,
    reason="scikit-image is not installed: pip install --no-deps scikit-image==0.26.0",
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@needs_skimage
def test_photo_crops_are_deterministic_windows_of_the_photographs():
    data = load_photo_crops()
    assert data.name == "photo-crops" and data.num_classes == len(PHOTOS) == 10
    assert data.images.shape == (5000, 3, 32, 32) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(10, dtype=np.int32), 500))
    np.testing.assert_array_equal(load_photo_crops().images, data.images)
    assert not np.array_equal(load_photo_crops(seed=1).images, data.images)
    assert load_pixel_dataset("photo-crops", 32).images.tobytes() == data.images.tobytes()

    # Crop 0 of each photograph: the window drawn from (0, label) of the photograph resized
    # (Lanczos) to a short side of 96 px, grey ones repeated over three channels.
    for label, name in enumerate(PHOTOS):
        with Image.open(photo_file(name)) as photo:
            photo = photo.convert("RGB")
            scale = 96 / min(photo.size)
            size = (max(96, round(photo.width * scale)), max(96, round(photo.height * scale)))
            pixels = np.asarray(photo.resize(size, Image.Resampling.LANCZOS))
        rng = np.random.default_rng([0, label])
        top = rng.integers(0, pixels.shape[0] - 31, 500)[0]
        left = rng.integers(0, pixels.shape[1] - 31, 500)[0]
        window = pixels[top : top + 32, left : left + 32].transpose(2, 0, 1)
        np.testing.assert_array_equal(data.images[label * 500], window, name)

    # Ten different pictures, none of them flat.
    per_photo = data.images.reshape(10, 500, 3, 32, 32).astype(np.float32)
    assert (per_photo.std(axis=(1, 2, 3, 4)) > 10).all()
    means = per_photo.mean(axis=(1, 3, 4))  # (photo, channel)
    assert len({tuple(np.round(m)) for m in means}) == 10


def test_pixel_datasets_say_what_is_missing(monkeypatch):
    with pytest.raises(DataError, match="not a positive multiple of 10"):
        load_photo_crops(num=15)
    with pytest.raises(DataError, match="'cifar' is not a pixel dataset"):
        load_pixel_dataset("cifar", 32)
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps scikit-image==0.26.0"):
        load_photo_crops()


@pytest.mark.slow
@needs_skimage
def test_photo_crops_train_and_evaluate(tmp_path, tiny_dinov2):
    """A few REPA steps on the photo crops (RGB, cached target features) with the in-training
    evaluation; a one-channel model or the MNIST classifier's metrics are refused."""
    recipe = eval_recipe(tmp_path / "run", tiny_dinov2, metrics=["fd_dinov2", "cknna"])
    data = replace(recipe.data, dataset="photo-crops", precompute_features=True)
    recipe = replace(recipe, data=data, model=replace(recipe.model, in_channels=3))
    train(recipe, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in rows if "cknna" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["fd_dinov2"]) and r["fd_dinov2"] > 0 for r in evals)
    assert all(r["steps_per_s"] > 0 for r in rows if "loss" in r)  # the speed is logged

    grey = replace(recipe, model=replace(recipe.model, in_channels=1))
    grey = replace(grey, output=replace(recipe.output, dir=str(tmp_path / "grey")))
    with pytest.raises(RecipeError, match="'model.in_channels': 1, but photo-crops has 3"):
        train(grey, progress=False)
    mnist_metrics = replace(recipe.eval, metrics=("fd_mnist",))
    mnist_metrics = replace(recipe, eval=mnist_metrics, output=grey.output)
    with pytest.raises(RecipeError, match="fd_mnist and class_accuracy need dataset 'mnist-5k'"):
        train(mnist_metrics, progress=False)

"""What every test shares: strict dtype and rank promotion, and the session fixtures (a
random DINOv2 in the Hub layout, one tiny trained run). jaxtyping + beartype check the
package's annotations in every test run (pyproject's `--jaxtyping-packages`). Tests on
several devices start a subprocess with the devices they need (XLA reads the flag once)."""

from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import CLASSES, GOOD, SETTINGS, TINY_VAE, picture, tiny_recipe, unchecked


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "standard_promotion: run with JAX's standard dtype and rank promotion (optax's Adam "
        "raises a float to an int32 step count; the SiT adds biases by rank promotion)",
    )
    config.addinivalue_line(
        "markers",
        "unchecked: run without the jaxtyping / beartype checker, for tests of the library's "
        "own errors on input its annotations already forbid (what a user without the checker "
        "sees)",
    )


@pytest.fixture(autouse=True)
def promotion(request):
    """Strict promotion everywhere (an implicit upcast or broadcast is a bug), unless the
    test is marked `standard_promotion`."""
    if request.node.get_closest_marker("standard_promotion"):
        yield
        return
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(autouse=True)
def typechecked(request):
    """The runtime type checker stays on, unless the test is marked `unchecked`."""
    if not request.node.get_closest_marker("unchecked"):
        yield
        return
    with unchecked():
        yield


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A random DINOv2 saved by transformers in the Hub layout: patch 14, so 112 px -> 8x8."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    transformers.Dinov2Model(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """RUN: a 4-step run of `tiny_recipe` (checkpoints at 2 and 4, logs every 2 steps),
    trained once per session and shared by the export, push and sampling tests."""
    from repa_eqx.training import train

    root = tmp_path_factory.mktemp("runs")
    steps = {"steps": 4, "checkpoint_every": 2, "log_every": 2}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        train(tiny_recipe(root / "tiny", train=steps), progress=False)
    return root / "tiny"


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for seed, (label, name, size, mode) in enumerate(GOOD):
        path = root / CLASSES[label] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(size, mode, seed).save(path)
    rng = np.random.default_rng(0)
    (root / "n01443537/bad.jpg").write_bytes(rng.integers(0, 256, 3000, np.uint8).tobytes())
    whole = root / "n01484850/whole.png"
    picture((60, 60), "RGB", 99).save(whole)
    (root / "n01484850/cut.png").write_bytes(whole.read_bytes()[:-400])
    whole.unlink()
    (root / "n01440764/notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def vae_folder(tmp_path_factory) -> Path:
    """A tiny random diffusers AutoencoderKL (downsampling by 8, as SD's)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    blocks = len(TINY_VAE["block_out_channels"])
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        **TINY_VAE,
    )
    with torch.no_grad():  # off the init: non-trivial means and stds
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("tiny_vae")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dataset(source, vae_folder, tmp_path_factory) -> Path:
    """One uninterrupted run: what every other way of producing it must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    from repa_eqx.data.writer import preprocess

    result = preprocess(source, out, vae=str(vae_folder), **SETTINGS)
    assert result.manifest is not None and result.shards_written == result.num_shards == 3
    return out

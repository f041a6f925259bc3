import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from repa_eqx.data.datasets import load_mnist_5k
from repa_eqx.evaluation import fd_dinov2 as fd
from repa_eqx.evaluation.adm import gaussian_statistics
from repa_eqx.pretrained.dinov2 import cls_features
from repa_eqx.pretrained.registry import load_dinov2

PATCH = 14
NATIVE = 56  # a 4x4 position table


def _torch_model(registers: int = 0):
    config_cls, model_cls = (
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel)
        if registers
        else (Dinov2Config, Dinov2Model)
    )
    extra = {"num_register_tokens": registers} if registers else {}
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=PATCH,
        image_size=NATIVE,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # move every tensor off its init (layer scale 1, zero registers)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _torch_model()
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def digits():
    """Two disjoint sets of 128 MNIST digits, every class in each."""
    images = load_mnist_5k().images
    return images[0::39][:128], images[1::39][:128]


def test_tokens_match_transformers(tmp_path):
    torch_model = _torch_model(registers=4)
    torch_model.save_pretrained(tmp_path)
    model = load_dinov2(str(tmp_path))
    pixels = np.random.default_rng(1).standard_normal((2, 3, NATIVE, NATIVE)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    tokens = np.asarray(jax.vmap(model.tokens)(jnp.asarray(pixels)))
    assert tokens.shape == reference.shape  # CLS, 4 registers, 16 patches
    np.testing.assert_allclose(tokens, reference, rtol=0, atol=1e-4)
    patches = np.asarray(jax.vmap(model)(jnp.asarray(pixels)))
    np.testing.assert_array_equal(patches, tokens[:, 5:])


@pytest.mark.parametrize("resolution", [NATIVE, 84])  # 84: the 4x4 table resampled to 6x6
def test_cls_features_match_transformers(checkpoint, resolution):
    torch_model, folder = checkpoint
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)  # grey, upsampled
    # EDM2's input: bicubic resize with antialias, /255, ImageNet normalisation.
    x = torch.from_numpy(images).float().expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = torch_model(pixel_values=(x - mean) / std)
    np.testing.assert_allclose(
        out.pooler_output.numpy(), out.last_hidden_state[:, 0].numpy(), rtol=0, atol=0
    )
    model = fd.load_fd_model(str(folder), resolution=resolution)
    ours = cls_features(model, images, resolution, batch_size=2, progress=False)
    assert ours.shape == (5, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, out.pooler_output.numpy(), rtol=0, atol=1e-4)


def test_resolution_must_fit_patches(checkpoint):
    _, folder = checkpoint
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        fd.load_fd_model(str(folder), resolution=50)


def test_fd_of_a_set_with_itself(checkpoint, digits):
    _, folder = checkpoint
    model = fd.load_fd_model(str(folder), resolution=NATIVE)
    images, _ = digits
    mu, sigma = fd.dinov2_statistics(images, model, resolution=NATIVE, progress=False)
    distance = fd.fd_dinov2(images, images, model=model, resolution=NATIVE, progress=False)
    assert abs(distance) < 1e-6 * np.trace(sigma)


def test_fd_grows_with_corruption(checkpoint, digits):
    _, folder = checkpoint
    model = fd.load_fd_model(str(folder), resolution=NATIVE)
    reference, samples = digits
    ref_stats = fd.dinov2_statistics(reference, model, resolution=NATIVE, progress=False)
    noise = np.random.default_rng(3).standard_normal(samples.shape)
    distances = []
    for sigma in (0, 20, 60, 120):
        noisy = np.clip(samples + sigma * noise, 0, 255).astype(np.uint8)
        distances.append(
            fd.fd_dinov2(noisy, ref_stats, model=model, resolution=NATIVE, progress=False)
        )
    assert 0 < distances[0] and all(np.diff(distances) > 0), distances
    assert distances[-1] > 5 * distances[0], distances


def test_reference_statistics_are_cached(checkpoint, digits, tmp_path, monkeypatch):
    _, folder = checkpoint
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path))
    reference, samples = digits
    stats = fd.reference_statistics(reference, str(folder), resolution=NATIVE, progress=False)
    model = fd.load_fd_model(str(folder), resolution=NATIVE)
    features = cls_features(model, reference, NATIVE, progress=False)
    for ours, expected in zip(stats, gaussian_statistics(features), strict=True):
        np.testing.assert_array_equal(ours, expected)
    (cached,) = (tmp_path / "fd_dinov2" / "v1").iterdir()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded: the cache was not used")

    monkeypatch.setattr(fd, "load_fd_model", no_model)
    again = fd.reference_statistics(reference, str(folder), resolution=NATIVE, progress=False)
    np.testing.assert_array_equal(again[1], stats[1])
    # Stored statistics give the distance the images give.
    from_stats = fd.fd_dinov2(samples, again, model=model, resolution=NATIVE, progress=False)
    from_images = fd.fd_dinov2(samples, reference, model=model, resolution=NATIVE, progress=False)
    assert from_stats == pytest.approx(from_images, rel=1e-9)

    cached.write_bytes(b"not an npz")  # a damaged file is recomputed, not trusted
    monkeypatch.setattr(fd, "load_fd_model", lambda *a, **k: model)
    repaired = fd.reference_statistics(reference, str(folder), resolution=NATIVE, progress=False)
    np.testing.assert_array_equal(repaired[0], stats[0])
    assert fd.load_statistics(cached)[0].shape == (32,)

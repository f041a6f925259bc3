import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from repa_eqx import WeightsMismatch
from repa_eqx.pretrained.mae import MaeConfig, encode
from repa_eqx.pretrained.registry import load_mae

PATCH = 16
NATIVE = 64  # a 4x4 position table
ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=PATCH,
)
DECODER = dict(
    decoder_hidden_size=32,
    decoder_intermediate_size=64,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
)


def _mae(cls=ViTMAEModel, image_size: int = NATIVE, seed: int = 0):
    """A random MAE; its config keeps the Hub's mask_ratio 0.75, which we must ignore."""
    torch.manual_seed(seed)
    model = cls(ViTMAEConfig(image_size=image_size, **ENCODER, **DECODER))
    with torch.no_grad():  # move every tensor off its init (unit LayerNorms, zero biases)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A ViTMAEModel and the folder it was saved in."""
    folder = tmp_path_factory.mktemp("mae")
    model = _mae()
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module", params=["model", "pretraining"])
def checkpoint(request, plain, tmp_path_factory):
    """(the transformers encoder, its folder): a ViTMAEModel, or a ViTMAEForPreTraining as on
    the Hub (encoder under `vit.`, plus a decoder)."""
    if request.param == "model":
        return plain
    folder = tmp_path_factory.mktemp("pretraining")
    model = _mae(ViTMAEForPreTraining)
    model.save_pretrained(folder)
    return model.vit, folder


def _reference(encoder, pixels: np.ndarray, **kwargs) -> np.ndarray:
    """REPA's MAE features: every patch in order (no masking), the last block's output
    without the final LayerNorm, CLS dropped."""
    encoder.config.mask_ratio = 0.0
    grid = pixels.shape[-1] // PATCH
    in_order = torch.arange(grid * grid, dtype=torch.float32).expand(len(pixels), -1)
    with torch.no_grad():
        out = encoder(
            pixel_values=torch.from_numpy(pixels),
            noise=in_order,
            output_hidden_states=True,
            **kwargs,
        )
    return out.hidden_states[-1][:, 1:].numpy()


def _ours(model, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(jax.vmap(model)(jnp.asarray(pixels)))


def _pixels(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def test_native_size(checkpoint):
    torch_model, folder = checkpoint
    model = load_mae(str(folder))
    assert model.grid == NATIVE // PATCH
    pixels = _pixels(NATIVE)
    ours = _ours(model, pixels)
    assert ours.shape == (2, (NATIVE // PATCH) ** 2, ENCODER["hidden_size"])
    np.testing.assert_allclose(ours, _reference(torch_model, pixels), rtol=0, atol=1e-4)


def test_no_final_layernorm(plain):
    """transformers' last_hidden_state is normed; REPA's forward_features is not."""
    torch_model, folder = plain
    pixels = _pixels(NATIVE)
    ours = _ours(load_mae(str(folder)), pixels)
    with torch.no_grad():
        normed = torch_model.layernorm(torch.tensor(ours)).numpy()
    torch_model.config.mask_ratio = 0.0
    in_order = torch.arange(16, dtype=torch.float32).expand(2, -1)
    with torch.no_grad():
        last = torch_model(pixel_values=torch.from_numpy(pixels), noise=in_order)
    np.testing.assert_allclose(normed, last.last_hidden_state[:, 1:].numpy(), atol=1e-4)


@pytest.mark.parametrize("size", [96, 48])  # grid 6 (up) and 3 (down) from the 4x4 table
def test_transformers_interpolation(plain, size):
    torch_model, folder = plain
    model = load_mae(str(folder), grid=size // PATCH, pos_interp="transformers")
    pixels = _pixels(size)
    ref = _reference(torch_model, pixels, interpolate_pos_encoding=True)
    np.testing.assert_allclose(_ours(model, pixels), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [96, 48])
def test_timm_interpolation(plain, size):
    """The default and the reference's route (utils.py): resample_abs_pos_embed on the
    checkpoint's table (bicubic, antialiased), then a model built for the new size."""
    source, folder = plain
    grid, old = size // PATCH, NATIVE // PATCH
    state = source.state_dict()
    pos = state["embeddings.position_embeddings"]
    table = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    table = F.interpolate(
        table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
    )
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    state["embeddings.position_embeddings"] = torch.cat([pos[:, :1], table], dim=1)
    reference = ViTMAEModel(ViTMAEConfig(image_size=size, **ENCODER)).eval()
    reference.load_state_dict(state)

    model = load_mae(str(folder), grid=grid)
    pixels = _pixels(size)
    np.testing.assert_allclose(_ours(model, pixels), _reference(reference, pixels), atol=1e-4)
    other = load_mae(str(folder), grid=grid, pos_interp="transformers")
    assert np.abs(_ours(other, pixels) - _ours(model, pixels)).max() > 1e-3


def test_wrong_grid_is_refused(plain):
    _, folder = plain
    with pytest.raises(ValueError, match="patch grid"):
        load_mae(str(folder))(jnp.zeros((3, 96, 96)))


def test_config(plain):
    _, folder = plain
    config = MaeConfig.from_json(folder / "config.json")
    assert (config.hidden_size, config.patch_size, config.grid) == (64, PATCH, NATIVE // PATCH)
    assert config.layer_norm_eps == 1e-12
    with pytest.raises(ValueError, match="model_type 'clip'"):
        MaeConfig.from_dict({"model_type": "clip"})
    with pytest.raises(ValueError, match="lacks"):
        MaeConfig.from_dict({"model_type": "vit_mae", "hidden_size": 64})


def test_mismatched_weights_are_listed(tmp_path):
    _mae().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.bias"]
    tensors["encoder.layer.0.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["embeddings.cls_token"] = np.zeros((1, 1, 63), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatch) as error:
        load_mae(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "MAE ViT with 2 layers of width 64" in message
    assert "missing: encoder.layer.1.output.dense.bias" in message
    assert "unexpected: encoder.layer.0.extra.weight" in message
    assert "wrong shape: embeddings.cls_token (1, 1, 63) (expected (64,))" in message


def test_encode_feeds_images_at_their_size(plain):
    """REPA's preprocess_raw_image for 'mae': /255 and ImageNet Normalize, no resize."""
    _, folder = plain
    model = load_mae(str(folder))
    images = np.random.default_rng(3).integers(0, 256, (2, 3, NATIVE, NATIVE), dtype=np.uint8)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    pixels = ((images / np.float32(255) - mean) / std).astype(np.float32)
    features = encode(model, jnp.asarray(images), NATIVE)
    np.testing.assert_allclose(np.asarray(features), _ours(model, pixels), atol=1e-5)

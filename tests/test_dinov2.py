import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import Dinov2Config as HFConfig
from transformers import Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from repa_eqx import WeightsMismatch
from repa_eqx.pretrained import PretrainedNotFound
from repa_eqx.pretrained.dinov2 import Dinov2Config, encode, encode_with_attention, preprocess
from repa_eqx.pretrained.registry import load_dinov2, locate

PATCH = 14
NATIVE = 56  # a 4x4 position table

# name -> (transformers model class, config class, extra config)
VARIANTS = {
    "plain": (Dinov2Model, HFConfig, {}),
    "swiglu_no_qkv_bias": (Dinov2Model, HFConfig, {"use_swiglu_ffn": True, "qkv_bias": False}),
    "registers": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig, {"num_register_tokens": 4}),
}


def _torch_model(variant: str, image_size: int = NATIVE, seed: int = 0):
    model_cls, config_cls, extra = VARIANTS[variant]
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=PATCH,
        image_size=image_size,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # move every tensor off its init (layer scale 1, zero registers)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    model = _torch_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def _patch_tokens(model, pixels: np.ndarray) -> np.ndarray:
    registers = getattr(model.config, "num_register_tokens", 0)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    return out[:, 1 + registers :].numpy()


def _ours(model, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(jax.vmap(model)(jnp.asarray(pixels)))


def _pixels(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def test_native_size(checkpoint):
    _, torch_model, folder = checkpoint
    model = load_dinov2(str(folder))
    assert model.grid == NATIVE // PATCH
    pixels = _pixels(NATIVE)
    np.testing.assert_allclose(
        _ours(model, pixels), _patch_tokens(torch_model, pixels), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("size", [84, 42])  # grid 6 (up) and 3 (down) from the 4x4 table
def test_transformers_interpolation(checkpoint, size):
    _, torch_model, folder = checkpoint
    model = load_dinov2(str(folder), grid=size // PATCH, pos_interp="transformers")
    pixels = _pixels(size)
    np.testing.assert_allclose(
        _ours(model, pixels), _patch_tokens(torch_model, pixels), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("size", [84, 42])
def test_timm_interpolation(checkpoint, size):
    variant, torch_model, folder = checkpoint
    grid = size // PATCH
    # The reference: timm's resample_abs_pos_embed, then a model whose table is that grid.
    state = torch_model.state_dict()
    pos = state["embeddings.position_embeddings"]
    old = NATIVE // PATCH
    table = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    table = F.interpolate(
        table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
    )
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    state["embeddings.position_embeddings"] = torch.cat([pos[:, :1], table], dim=1)
    reference = _torch_model(variant, image_size=size)
    reference.load_state_dict(state)

    model = load_dinov2(str(folder), grid=grid, pos_interp="timm")
    pixels = _pixels(size)
    np.testing.assert_allclose(
        _ours(model, pixels), _patch_tokens(reference, pixels), rtol=0, atol=1e-4
    )
    if variant == "plain":  # Dinov2Model interpolates without antialias: a real difference
        other = load_dinov2(str(folder), grid=grid, pos_interp="transformers")
        assert np.abs(_ours(other, pixels) - _ours(model, pixels)).max() > 1e-3


def test_attention_maps_for_haste(checkpoint):
    """The attention logits of chosen layers: their softmax is transformers' attention
    probabilities; the features are unchanged; `encode_with_attention` keeps the patches'
    rows and columns (CLS and registers dropped), as HASTE's modified DINOv2 returns them."""
    _, torch_model, folder = checkpoint
    model = load_dinov2(str(folder))
    pixels = _pixels(NATIVE)
    torch_model.set_attn_implementation("eager")  # sdpa returns no attention probabilities
    with torch.no_grad():
        probs = torch_model(pixel_values=torch.from_numpy(pixels), output_attentions=True)
    probs = [a.numpy() for a in probs.attentions]
    layers = (2, 1)
    tokens, logits = jax.vmap(lambda im: model.tokens_and_attention(im, layers))(pixels)
    for i, layer in enumerate(layers):
        ours = jax.nn.softmax(logits[:, i], axis=-1)
        np.testing.assert_allclose(ours, probs[layer - 1], rtol=0, atol=1e-5)
    plain = jax.vmap(model.tokens)(jnp.asarray(pixels))  # the blocks in other scans
    np.testing.assert_allclose(tokens, plain, rtol=0, atol=1e-5)
    first = 1 + model.register_tokens.shape[0]
    images = np.random.default_rng(2).integers(0, 256, (2, 3, NATIVE, NATIVE), dtype=np.uint8)
    feats, maps = encode_with_attention(model, jnp.asarray(images), NATIVE, (1,))
    assert maps.shape == (2, 1, 2, 16, 16)
    np.testing.assert_allclose(feats, encode(model, jnp.asarray(images), NATIVE), atol=1e-5)
    inputs = jax.vmap(lambda im: preprocess(im, NATIVE))(jnp.asarray(images))
    _, full = jax.vmap(lambda im: model.tokens_and_attention(im, (1,)))(inputs)
    np.testing.assert_allclose(maps, full[:, :, :, first:, first:], atol=1e-5)


def test_wrong_grid_is_refused(checkpoint):
    _, _, folder = checkpoint
    model = load_dinov2(str(folder))
    with pytest.raises(ValueError, match="patch grid"):
        model(jnp.zeros((3, 84, 84)))


def test_config_from_json(checkpoint):
    variant, torch_model, folder = checkpoint
    config = Dinov2Config.from_json(folder / "config.json")
    assert config.num_register_tokens == getattr(torch_model.config, "num_register_tokens", 0)
    assert config.grid == NATIVE // PATCH
    if variant == "swiglu_no_qkv_bias":
        # transformers' SwiGLU width rule: 2/3 of 4 x 32, rounded up to a multiple of 8.
        assert config.mlp_hidden_size == torch_model.encoder.layer[0].mlp.down_proj.in_features


def test_giant_width_rule():
    giant = Dinov2Config(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4.0,
        patch_size=14, image_size=518, use_swiglu_ffn=True,
    )  # fmt: skip
    assert giant.mlp_hidden_size == 4096


def test_mismatched_weights_are_listed(tmp_path):
    _torch_model("plain").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layer.1.norm2.bias"]
    tensors["encoder.layer.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
    tensors["layernorm.weight"] = np.zeros((31,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatch) as error:
        load_dinov2(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "missing: encoder.layer.1.norm2.bias" in message
    assert "unexpected: encoder.layer.0.mlp.fc3.weight" in message
    assert "wrong shape: layernorm.weight (31,) (expected (32,))" in message


def test_preprocess_matches_torch():
    rng = np.random.default_rng(2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for shape, resolution in [((3, 256, 256), 224), ((3, 100, 80), 112), ((1, 64, 64), 112)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        x = torch.from_numpy(image).expand(3, -1, -1) / 255.0
        ref = F.interpolate(((x - mean) / std)[None], size=resolution, mode="bicubic")[0]
        ours = np.asarray(preprocess(jnp.asarray(image), resolution))
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-5)


def test_encode_batch(checkpoint):
    _, _, folder = checkpoint
    model = load_dinov2(str(folder), grid=3)
    images = np.random.default_rng(3).integers(0, 256, (2, 3, 48, 48), dtype=np.uint8)
    features = encode(model, jnp.asarray(images), 42)
    assert features.shape == (2, 9, 32)
    single = model(preprocess(jnp.asarray(images[1]), 42))
    np.testing.assert_allclose(np.asarray(features[1]), np.asarray(single), atol=1e-5)


def test_local_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(PretrainedNotFound, match=r"\*\.safetensors"):
        locate(str(tmp_path))


def test_offline_and_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedNotFound) as error:
        locate("facebook/dinov2-small")
    message = str(error.value)
    assert "\n" not in message
    assert "facebook/dinov2-small" in message and "local folder" in message

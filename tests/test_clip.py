import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from repa_eqx import WeightsMismatch
from repa_eqx.pretrained.clip import ClipVisionConfig, encode, preprocess
from repa_eqx.pretrained.registry import load_clip_vision

PATCH = 14
NATIVE = 56  # a 4x4 position table
VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=PATCH,
)


def _perturb(model, seed: int = 0):
    """Move every tensor off its init (unit LayerNorms, zero biases) so each one matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _vision_model(image_size: int = NATIVE) -> CLIPVisionModel:
    torch.manual_seed(0)
    return _perturb(CLIPVisionModel(CLIPVisionConfig(image_size=image_size, **VISION)))


def _save_prefixed(model: CLIPVisionModel, folder) -> None:
    """The layout transformers < 5 saved a CLIPVisionModel in: keys under `vision_model.`."""
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in tensors.items()}, folder / "model.safetensors")


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """A CLIPVisionModel and the folder it was saved in (transformers 5: bare keys)."""
    folder = tmp_path_factory.mktemp("vision")
    model = _vision_model()
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module", params=["vision", "prefixed", "full"])
def checkpoint(request, vision, tmp_path_factory):
    """(variant, the transformers vision tower, its saved folder), in each layout we read."""
    if request.param == "vision":
        return request.param, *vision
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "prefixed":
        _save_prefixed(vision[0], folder)
        return request.param, vision[0], folder
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(vision_config=dict(image_size=NATIVE, **VISION), text_config=text)
    full = _perturb(CLIPModel(config))
    full.save_pretrained(folder)
    return request.param, full.vision_model, folder


def _reference(vision_model, pixels: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = vision_model(pixel_values=torch.from_numpy(pixels), **kwargs).last_hidden_state
    return out[:, 1:].numpy()  # the last block's tokens, before post_layernorm, CLS dropped


def _ours(model, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(jax.vmap(model)(jnp.asarray(pixels)))


def _pixels(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def test_native_size(checkpoint):
    _, torch_model, folder = checkpoint
    model = load_clip_vision(str(folder))
    assert model.grid == NATIVE // PATCH
    pixels = _pixels(NATIVE)
    ours, ref = _ours(model, pixels), _reference(torch_model, pixels)
    assert ours.shape == (2, (NATIVE // PATCH) ** 2, VISION["hidden_size"])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [84, 42])  # grid 6 (up) and 3 (down) from the 4x4 table
def test_transformers_interpolation(vision, size):
    torch_model, folder = vision
    model = load_clip_vision(str(folder), grid=size // PATCH, pos_interp="transformers")
    pixels = _pixels(size)
    ref = _reference(torch_model, pixels, interpolate_pos_encoding=True)
    np.testing.assert_allclose(_ours(model, pixels), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [84, 42])
def test_timm_interpolation(vision, size):
    """The default: the table resampled as timm's resample_abs_pos_embed (antialiased)."""
    source, folder = vision
    grid, old = size // PATCH, NATIVE // PATCH
    state = source.state_dict()
    pos = state["embeddings.position_embedding.weight"]
    table = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    table = F.interpolate(
        table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
    )
    table = table.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    state["embeddings.position_embedding.weight"] = torch.cat([pos[:1], table])
    reference = CLIPVisionModel(CLIPVisionConfig(image_size=size, **VISION)).eval()
    reference.load_state_dict(state)

    model = load_clip_vision(str(folder), grid=grid)
    pixels = _pixels(size)
    np.testing.assert_allclose(_ours(model, pixels), _reference(reference, pixels), atol=1e-4)
    other = load_clip_vision(str(folder), grid=grid, pos_interp="transformers")
    assert np.abs(_ours(other, pixels) - _ours(model, pixels)).max() > 1e-3


def test_wrong_grid_is_refused(vision):
    _, folder = vision
    with pytest.raises(ValueError, match="patch grid"):
        load_clip_vision(str(folder))(jnp.zeros((3, 84, 84)))


def test_config_flat_and_nested(checkpoint):
    variant, _, folder = checkpoint
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == ("clip" if variant == "full" else "clip_vision_model")
    config = ClipVisionConfig.from_json(folder / "config.json")
    assert (config.hidden_size, config.patch_size, config.grid) == (64, PATCH, NATIVE // PATCH)
    assert config.hidden_act == "quick_gelu" and config.layer_norm_eps == 1e-5


def test_gelu_variant(tmp_path):
    """Some CLIP towers (e.g. LAION's) use the exact GELU instead of quick-GELU."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=NATIVE, hidden_act="gelu", **VISION)
    torch_model = _perturb(CLIPVisionModel(config))
    torch_model.save_pretrained(tmp_path)
    pixels = _pixels(NATIVE)
    ours = _ours(load_clip_vision(str(tmp_path)), pixels)
    np.testing.assert_allclose(ours, _reference(torch_model, pixels), rtol=0, atol=1e-4)


def test_config_rules():
    nested = {"model_type": "clip", "vision_config": dict(image_size=224, **VISION)}
    # transformers lets an older config's `vision_config_dict` override `vision_config`.
    nested["vision_config_dict"] = {"patch_size": 16}
    assert ClipVisionConfig.from_dict(nested).patch_size == 16
    with pytest.raises(ValueError, match="model_type 'dinov2'"):
        ClipVisionConfig.from_dict({"model_type": "dinov2"})
    with pytest.raises(ValueError, match="relu"):
        ClipVisionConfig.from_dict(
            {"model_type": "clip_vision_model", "image_size": 224, "hidden_act": "relu", **VISION}
        )
    with pytest.raises(ValueError, match="lacks"):
        ClipVisionConfig.from_dict({"model_type": "clip_vision_model"})


def test_mismatched_weights_are_listed(tmp_path):
    _vision_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["encoder.layers.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
    tensors["pre_layrnorm.weight"] = np.zeros((63,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatch) as error:
        load_clip_vision(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "CLIP vision tower with 2 layers of width 64" in message
    assert "missing: encoder.layers.1.mlp.fc2.bias" in message
    assert "unexpected: encoder.layers.0.mlp.fc3.weight" in message
    assert "wrong shape: pre_layrnorm.weight (63,) (expected (64,))" in message


def test_preprocess_matches_reference():
    """train.py's preprocess_raw_image for 'clip': /255, bicubic resize, then Normalize."""
    rng = np.random.default_rng(2)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    for shape, resolution in [((3, 256, 256), 224), ((3, 100, 80), 112), ((1, 64, 64), 112)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        x = torch.from_numpy(image).expand(3, -1, -1)[None] / 255.0
        ref = (F.interpolate(x, size=resolution, mode="bicubic")[0] - mean) / std
        ours = np.asarray(preprocess(jnp.asarray(image), resolution))
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-5)


def test_encode_batch(vision):
    _, folder = vision
    model = load_clip_vision(str(folder), grid=3)
    images = np.random.default_rng(3).integers(0, 256, (2, 3, 48, 48), dtype=np.uint8)
    features = encode(model, jnp.asarray(images), 42)
    assert features.shape == (2, 9, 64)
    single = model(preprocess(jnp.asarray(images[1]), 42))
    np.testing.assert_allclose(np.asarray(features[1]), np.asarray(single), atol=1e-5)

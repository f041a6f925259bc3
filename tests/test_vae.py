import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from repa_eqx import WeightsMismatch
from repa_eqx.pretrained.registry import load_vae
from repa_eqx.pretrained.vae import SCALING_FACTOR, VAEConfig, decode, encode, from_state_dict
from repa_eqx.spaces.sd_vae import latents_to_uint8, to_latents, to_uint8

WEIGHTS = "diffusion_pytorch_model.safetensors"
SMALL = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8}
# sd-vae-ft-mse's architecture.
SD = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
BARE = {"use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False}
VARIANTS = {"quant_conv_attention": {}, "bare": BARE}


def _torch_vae(architecture: dict, seed: int = 0, **extra) -> TorchAutoencoderKL:
    blocks = len(architecture["block_out_channels"])
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        **architecture,
        **extra,
    ).eval()
    with torch.no_grad():
        # Move every tensor off its init (unit norm scales, zero biases) at its own scale.
        for param in model.parameters():
            param.add_((param.std() if param.ndim > 1 else 0.1) * torch.randn_like(param))
        if model.quant_conv is not None:  # push two log-variance channels past the clamps
            model.quant_conv.bias[4] += 40
            model.quant_conv.bias[5] -= 60
    return model


def _images(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def _reference(model: TorchAutoencoderKL, images: np.ndarray):
    """diffusers' posterior mean and std, and the decoded posterior mean."""
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(posterior.mean).sample
    return posterior.mean.numpy(), posterior.std.numpy(), decoded.numpy()


def _assert_parity(vae, model: TorchAutoencoderKL, images: np.ndarray):
    mean, std, decoded = _reference(model, images)
    ours_mean, ours_std = encode(vae, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(ours_mean), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours_std), std, rtol=1e-4, atol=1e-4)
    ours_decoded = decode(vae, jnp.asarray(mean))
    np.testing.assert_allclose(np.asarray(ours_decoded), decoded, rtol=1e-4, atol=1e-4)
    return std


def _same_leaves(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    model = _torch_vae(SMALL, **VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small VAE with every part (quant convs, mid-block attention)."""
    model = _torch_vae(SMALL)
    folder = tmp_path_factory.mktemp("small")
    model.save_pretrained(folder)
    return model, folder


def test_small_parity(checkpoint):
    variant, model, folder = checkpoint
    vae = load_vae(str(folder))
    std = _assert_parity(vae, model, _images(32))
    if variant == "quant_conv_attention":  # both clamps were hit
        assert np.isclose(std[:, 0].max(), np.exp(10.0))
        assert np.isclose(std[:, 1].min(), np.exp(-15.0))


def test_sd_architecture_parity():
    model = _torch_vae(SD)
    config = VAEConfig.from_dict(dict(model.config))
    assert config.block_out_channels == SD["block_out_channels"]
    tensors = {name: value.numpy() for name, value in model.state_dict().items()}
    _assert_parity(from_state_dict(config, tensors), model, _images(32, batch=1))


# An f16d32-style VAE in miniature: self-attention after every resnet of the lowest level.
LEVEL_ATTENTION = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 8,
    "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
}


def test_attention_levels_and_published_statistics(tmp_path):
    """diffusers' Attn*Block2D levels (REPA-E's *-hf VAEs), parity; the statistics are kept."""
    mean, std = [0.1 * i for i in range(8)], [1.0 + 0.5 * i for i in range(8)]
    torch.manual_seed(2)
    model = TorchAutoencoderKL(**LEVEL_ATTENTION, latents_mean=mean, latents_std=std).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_((param.std() if param.ndim > 1 else 0.1) * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    vae = load_vae(str(tmp_path))
    config = vae.config
    assert (config.down_attention, config.up_attention) == ((1,), (0,))
    assert config.down_block_types == LEVEL_ATTENTION["down_block_types"]
    assert config.up_block_types == LEVEL_ATTENTION["up_block_types"]
    np.testing.assert_allclose(config.latents_mean, mean)
    np.testing.assert_allclose(config.latents_std, std)
    assert len(vae.encoder.down_blocks[1].attentions) == 1
    assert not vae.encoder.down_blocks[0].attentions and not vae.decoder.up_blocks[1].attentions
    assert len(vae.decoder.up_blocks[0].attentions) == 2
    images = _images(16, batch=1)
    reference = _reference(model, images)
    ours_mean, ours_std = encode(vae, jnp.asarray(images))
    ours = (ours_mean, ours_std, decode(vae, jnp.asarray(reference[0])))
    diffs = [float(np.abs(np.asarray(o) - r).max()) for o, r in zip(ours, reference, strict=True)]
    print("max abs diff (mean, std, decoded):", diffs)
    for o, r in zip(ours, reference, strict=True):
        np.testing.assert_allclose(np.asarray(o), r, rtol=1e-4, atol=1e-4)


def test_config_from_json(checkpoint):
    variant, _, folder = checkpoint
    config = VAEConfig.from_json(folder / "config.json")
    assert config == VAEConfig(**SMALL, sample_size=32, **VARIANTS[variant])
    assert config.scaling_factor == SCALING_FACTOR


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"act_fn": "relu"}, "act_fn"),
        ({"_class_name": "AutoencoderTiny"}, "_class_name"),
        ({"up_block_types": ["UpDecoderBlock2D", "CrossAttnUpBlock2D"]}, "up_block_types"),
        ({"down_block_types": ["DownEncoderBlock2D"]}, "down_block_types"),
        ({"latents_mean": [0.0] * 3}, "latents_mean has 3 values"),
        ({"latents_std": [1.0, 1.0, 0.0, 1.0]}, "latents_std"),
        ({"norm_num_groups": 24}, "norm_num_groups"),
    ],
)
def test_unsupported_config(small, tmp_path, change, complaint):
    _, folder = small
    raw = json.loads((folder / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=complaint):
        VAEConfig.from_json(tmp_path / "config.json")


def test_legacy_attention_names(small, tmp_path):
    _, folder = small
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, value in load_file(folder / WEIGHTS).items():
        for new, old in renames.items():
            stem = f"mid_block.attentions.0.{new}."
            if stem in name:
                name = name.replace(stem, f"mid_block.attentions.0.{old}.")
                if name.startswith("encoder") and value.ndim == 2:  # as a 1x1 conv
                    value = value[:, :, None, None]
        legacy[name] = value
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in legacy
    assert legacy["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    save_file(legacy, tmp_path / WEIGHTS)
    shutil.copy(folder / "config.json", tmp_path)
    assert _same_leaves(load_vae(str(tmp_path)), load_vae(str(folder)))


def test_old_and_new_name_together(small):
    _, folder = small
    tensors = load_file(folder / WEIGHTS)
    old = "encoder.mid_block.attentions.0.query.weight"
    tensors[old] = tensors["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(WeightsMismatch, match=f"unexpected: {old}"):
        from_state_dict(VAEConfig.from_json(folder / "config.json"), tensors)


def test_mismatched_weights_are_listed(small, tmp_path):
    _, folder = small
    tensors = load_file(folder / WEIGHTS)
    del tensors["decoder.up_blocks.1.resnets.1.norm2.bias"]
    tensors["encoder.down_blocks.0.resnets.0.conv3.weight"] = np.zeros((2, 2), np.float32)
    tensors["encoder.conv_in.weight"] = np.zeros((32, 3, 3, 2), np.float32)
    save_file(tensors, tmp_path / WEIGHTS)
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(WeightsMismatch) as error:
        load_vae(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "missing: decoder.up_blocks.1.resnets.1.norm2.bias" in message
    assert "unexpected: encoder.down_blocks.0.resnets.0.conv3.weight" in message
    assert "wrong shape: encoder.conv_in.weight (32, 3, 3, 2) (expected (32, 3, 3, 3))" in message


def test_to_uint8_matches_repa():
    values = np.random.default_rng(3).uniform(-1.2, 1.2, (2, 3, 8, 8)).astype(np.float32)
    # Edges: the ends, and inputs that land exactly on (or next to) an integer.
    edges = np.array([-1, 1, 0, 1 / 255 - 1, 2 / 255 - 1, np.nextafter(np.float32(0), 1)])
    values.reshape(-1)[: len(edges)] = edges
    samples = (torch.from_numpy(values) + 1) / 2.0
    reference = torch.clamp(255.0 * samples, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    ours = to_uint8(jnp.asarray(values))
    assert ours.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(ours), reference)


def test_latents_to_uint8(small):
    model, folder = small
    vae = load_vae(str(folder))
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    images = latents_to_uint8(vae, jnp.asarray(latents))
    assert images.shape == (2, 16, 16, 3) and images.dtype == jnp.uint8
    assert int(images.min()) == 0 and int(images.max()) == 255  # random weights saturate
    with torch.no_grad():
        decoded = model.decode(torch.from_numpy(latents) / SCALING_FACTOR).sample
    reference = torch.clamp(255.0 * ((decoded + 1) / 2.0), 0, 255).permute(0, 2, 3, 1)
    # Float differences of ~1e-5 may move a value across an integer: at most by one.
    difference = np.abs(np.asarray(images, np.int16) - reference.to(torch.uint8).numpy())
    assert difference.max() <= 1 and difference.mean() < 0.01


def test_to_latents():
    key1, key2 = jr.split(jr.key(5))
    mean = 2 + jr.normal(key1, (8, 4, 32, 32))
    std = jnp.full((8, 4, 32, 32), 3.0)
    np.testing.assert_array_equal(np.asarray(to_latents(mean, std)), np.asarray(mean * 0.18215))
    sample = to_latents(mean, std, key=key2, scale=0.5)
    eps = jr.normal(key2, mean.shape)
    np.testing.assert_allclose(np.asarray(sample), np.asarray((mean + std * eps) * 0.5), atol=1e-6)
    noise = (sample / 0.5 - mean) / std
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    assert not np.allclose(np.asarray(to_latents(mean, std, key=key1)), np.asarray(sample))


def test_pipeline_folder(small, tmp_path):
    _, folder = small
    shutil.copytree(folder, tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    assert _same_leaves(load_vae(str(tmp_path)), load_vae(str(folder)))


def test_hub_layouts_from_cache(small, tmp_path, monkeypatch):
    """A VAE repository and a pipeline repository, both read offline from the Hub cache."""
    from huggingface_hub import constants

    _, folder = small
    commit = "0" * 40
    for repo, subfolder in (("someone--vae", ""), ("someone--pipeline", "vae")):
        cached = tmp_path / f"models--{repo}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs/main").write_text(commit)
        shutil.copytree(folder, cached / "snapshots" / commit / subfolder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    expected = load_vae(str(folder))
    assert _same_leaves(load_vae("someone/vae"), expected)
    assert _same_leaves(load_vae("someone/pipeline"), expected)


SHARDED = """
import equinox as eqx, jax, jax.random as jr, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from repa_eqx.pretrained.vae import AutoencoderKL, VAEConfig, decode, encode
mesh = jax.make_mesh((2,), ("data",))  # explicit axes: the strict sharding checks
config = VAEConfig((8, 16), 1, norm_num_groups=4)
skeleton = jax.eval_shape(lambda: AutoencoderKL(config, key=jr.key(0)))  # eager init is slow
rng = np.random.default_rng(0)
vae = jax.tree.map(lambda leaf: 0.3 * rng.standard_normal(leaf.shape, np.float32), skeleton)
images = jr.uniform(jr.key(1), (4, 3, 8, 8), minval=-1, maxval=1)
mean, _ = encode(vae, images)
sharded_mean, _ = encode(
    eqx.filter_shard(vae, NamedSharding(mesh, PartitionSpec())),
    jax.device_put(images, NamedSharding(mesh, PartitionSpec("data"))),
)
decoded = decode(vae, sharded_mean)
assert len(sharded_mean.sharding.device_set) == 2 and len(decoded.sharding.device_set) == 2
np.testing.assert_allclose(sharded_mean, mean, atol=1e-5)
np.testing.assert_allclose(decoded, decode(vae, mean), atol=1e-5)
"""


@pytest.mark.slow
def test_sharded_batch():
    """encode and decode run on a batch split over two (CPU) devices."""
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    subprocess.run([sys.executable, "-c", SHARDED], env=env, check=True, timeout=120)

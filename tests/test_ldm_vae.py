"""Latent-diffusion-format VAE checkpoints (VA-VAE, REPA-E's .pt files) read without torch into
our AutoencoderKL, against our PyTorch transcription of the LDM network
(benchmarks/torch_ldm_vae.py), random weights; the Hub ids of the table, offline."""

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx import WeightsMismatch
from repa_eqx.pretrained import ldm_vae, registry
from repa_eqx.pretrained.vae import (
    AutoencoderKL,
    VAEConfig,
    decode,
    encode,
    from_state_dict,
    targets,
)

_path = Path(__file__).parents[1] / "benchmarks" / "torch_ldm_vae.py"
_spec = importlib.util.spec_from_file_location("torch_ldm_vae", _path)
torch_ldm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_ldm)

# f16d32's shape in miniature: attention after every resnet of the lowest (16 px) level.
TINY = ldm_vae.LdmArchitecture(32, (1, 2), 1, 8, (16,), 32)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def reference():
    return torch_ldm.randomised(torch_ldm.AutoencoderKL(*dataclasses.astuple(TINY)))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_vavae(model, folder: Path, name: str = "vavae.pt") -> Path:
    """LightningDiT's layout: the weights under "state_dict" beside the loss's and the aligned
    foundation model's; `latents_stats.pt` with (1, C, 1, 1) mean and std."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"loss.logvar": torch.zeros(()), "foundation_model.model.w": torch.ones(3, 3)}
    torch.save({"state_dict": _state(model) | extra}, folder / name)
    mean = torch.linspace(-1, 1, 8).view(1, 8, 1, 1)
    torch.save(
        {"mean": mean, "std": torch.linspace(0.5, 2, 8).view(1, 8, 1, 1)},
        folder / "latents_stats.pt",
    )
    return folder / name


def _images(size: int = 16) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)


def test_ldm_names_cover_the_reference_state_dict(reference):
    config = VAEConfig.from_dict(ldm_vae.config_dict(TINY))
    assert (config.down_attention, config.up_attention) == ((1,), (0,))
    names = {ldm_vae.ldm_name(t.names, 2) for t in targets(config)}
    assert names == set(reference.state_dict())
    inferred = ldm_vae.config_dict(ldm_vae.architecture_of(reference.state_dict(), "ref"))
    assert inferred | {"sample_size": 32} == ldm_vae.config_dict(TINY)


def test_parity_with_the_ldm_network(reference, tmp_path):
    path = _save_vavae(reference, tmp_path)
    tensors = ldm_vae.read_checkpoint(path)
    vae = from_state_dict(VAEConfig.from_dict(ldm_vae.config_dict(TINY)), tensors)
    images = _images()
    with torch.no_grad():
        mean, std = reference.encode(torch.from_numpy(images))
        decoded = reference.decode(mean)
    ours_mean, ours_std = encode(vae, jnp.asarray(images))
    ours_decoded = decode(vae, jnp.asarray(mean.numpy()))
    pairs = [(ours_mean, mean), (ours_std, std), (ours_decoded, decoded)]
    print(
        "max abs diff (mean, std, decoded):",
        [float(np.abs(np.asarray(o) - r.numpy()).max()) for o, r in pairs],
    )
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=1e-4)


def test_a_missing_or_misshaped_weight_is_named(reference, tmp_path):
    tensors = {k: v.numpy() for k, v in _state(reference).items()}
    del tensors["decoder.up.1.attn.1.proj_out.bias"]
    tensors["encoder.down.1.block.0.conv1.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    tensors["loss.discriminator.w"] = np.zeros(2, np.float32)  # ignored
    config = VAEConfig.from_dict(ldm_vae.config_dict(TINY))
    with pytest.raises(WeightsMismatch) as error:
        from_state_dict(config, tensors)
    message = str(error.value)
    assert "\n" not in message and "loss." not in message
    assert "missing: decoder.up.1.attn.1.proj_out.bias" in message
    assert "wrong shape: encoder.down.1.block.0.conv1.weight (32, 32, 1, 1)" in message


def test_local_file_with_its_statistics(reference, tmp_path):
    """A local .pt: its architecture read from its weights, its statistics from beside it."""
    path = _save_vavae(reference, tmp_path / "vavae")
    located = registry.locate(str(path))
    assert located.config["latents_mean"] == pytest.approx(np.linspace(-1, 1, 8))
    config = VAEConfig.from_dict(located.config)
    assert config.latents_std == pytest.approx(np.linspace(0.5, 2, 8))
    assert config.scaling_factor == 1.0  # the statistics alone normalise
    vae = registry.load_vae(str(path))
    assert vae.config == config
    result = CliRunner().invoke(app, ["convert", str(path)])
    assert result.exit_code == 0 and result.output.startswith("sd-vae from "), result.output
    out = registry.convert(str(path))  # a cache hit
    assert registry.load_converted(out).config == config
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not an LDM autoencoder checkpoint"):
        registry.load_vae(str(tmp_path / "other.pt"))


def _fake_hub(tmp_path: Path, repo: str, files: dict[str, Path]) -> None:
    commit = "2" * 40
    cached = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    snapshot = cached / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_hub_ids_from_the_cache(reference, tmp_path, monkeypatch):
    """Both layouts under their Hub ids (offline, from a cache), architectures from the table."""
    from huggingface_hub import constants

    monkeypatch.setitem(
        ldm_vae.KNOWN, "hustvl/tiny-vavae", ldm_vae.KnownVAE(TINY, "vavae.pt", "latents_stats.pt")
    )
    monkeypatch.setitem(ldm_vae.KNOWN, "REPA-E/tiny-e2e", ldm_vae.KnownVAE(TINY, **ldm_vae._REPA_E))
    path = _save_vavae(reference, tmp_path / "files")
    _fake_hub(
        tmp_path,
        "hustvl/tiny-vavae",
        {"vavae.pt": path, "latents_stats.pt": path.parent / "latents_stats.pt"},
    )
    # REPA-E's: a bare state dict, {latents_bias, latents_scale}, a discriminator never read.
    torch.save(_state(reference), tmp_path / "e2e-tiny-400k.pt")
    scale = 1 / torch.linspace(0.5, 2, 8).view(1, 8, 1, 1)
    torch.save(
        {"latents_scale": scale, "latents_bias": torch.zeros(1, 8, 1, 1)}, tmp_path / "stats.pt"
    )
    (tmp_path / "disc.pt").write_bytes(b"not a checkpoint")
    _fake_hub(
        tmp_path,
        "REPA-E/tiny-e2e",
        {
            "e2e-tiny-400k.pt": tmp_path / "e2e-tiny-400k.pt",
            "e2e-tiny-400k-latents-stats.pt": tmp_path / "stats.pt",
            "e2e-tiny-400k-discriminator-ckpt.pt": tmp_path / "disc.pt",
        },
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    local = registry.load_vae(str(path))
    for repo in ("hustvl/tiny-vavae", "REPA-E/tiny-e2e"):
        vae = registry.load_vae(repo)
        assert vae.config.latents_std == pytest.approx(np.linspace(0.5, 2, 8))
        for ours, theirs in zip(jax.tree.leaves(vae), jax.tree.leaves(local), strict=True):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        out = registry.convert(repo)
        assert out.name == "2" * 40
        assert registry.load_converted(out).config == vae.config


def test_table_describes_the_published_architectures():
    f16d32 = VAEConfig.from_dict(ldm_vae.config_dict(ldm_vae.F16D32))
    assert f16d32.block_out_channels == (128, 128, 256, 256, 512)
    assert (f16d32.down_attention, f16d32.up_attention, f16d32.latent_channels) == ((4,), (0,), 32)
    f8d4 = VAEConfig.from_dict(ldm_vae.config_dict(ldm_vae.F8D4))
    assert f8d4.block_out_channels == (128, 256, 512, 512)
    assert (f8d4.down_attention, f8d4.up_attention, f8d4.latent_channels) == ((), (), 4)
    assert ldm_vae.known("REPA-E/E2E-VAVAE") is ldm_vae.KNOWN["REPA-E/e2e-vavae"]


@pytest.mark.parametrize("architecture", [ldm_vae.F16D32, ldm_vae.F8D4], ids=["f16d32", "f8d4"])
def test_full_size_names_and_shapes(architecture):
    """Every tensor of the full-size LDM network (built without memory) has its place in ours,
    at its shape."""
    with torch.device("meta"):
        reference = torch_ldm.AutoencoderKL(*dataclasses.astuple(architecture))
    theirs = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    config = VAEConfig.from_dict(ldm_vae.config_dict(architecture))
    skeleton = jax.eval_shape(lambda: AutoencoderKL(config, key=jax.random.key(0)))
    levels = len(architecture.ch_mult)
    ours = {ldm_vae.ldm_name(t.names, levels): t.where(skeleton).shape for t in targets(config)}
    assert ours.keys() == theirs.keys()
    squeezed = {name: tuple(d for d in shape if d != 1) for name, shape in theirs.items()}
    assert {name: tuple(d for d in shape if d != 1) for name, shape in ours.items()} == squeezed


def test_cli_offline_names_the_missing_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    result = CliRunner().invoke(app, ["convert", "hustvl/vavae-imagenet256-f16d32-dinov2"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'hustvl/vavae-imagenet256-f16d32-dinov2'" in lines[0]
    assert "is not in the Hub cache" in lines[0]


def test_preprocess_with_an_ldm_vae_and_its_published_statistics(reference, tmp_path, source):
    """`repa preprocess --vae file.pt`: a latent-diffusion checkpoint writes the shards (its
    moments equal the reference network's), the manifest names it as the latent space with the
    set's statistics, and its published `latents_stats.pt` are the "published" statistics."""
    from helpers import SETTINGS

    from repa_eqx.data.shards import read_manifest
    from repa_eqx.data.writer import preprocess
    from repa_eqx.spaces import published_norm, space_of

    path = _save_vavae(reference, tmp_path / "vavae")
    out = tmp_path / "out"
    result = preprocess(source, out, vae=str(path), **SETTINGS)
    manifest = result.manifest
    # The file's space is its content hash: a recipe naming the file matches its shards.
    assert manifest is not None and manifest["latent_space"] == space_of(path)
    assert space_of(path).startswith("local-")
    stats = manifest["latent_stats"]
    assert len(stats["mean"]) == len(stats["std"]) == TINY.z_channels
    shard = manifest["shards"][0]
    images = np.load(out / shard["path"] / "images.npy")
    moments = np.load(out / shard["path"] / "moments.npy")
    with torch.no_grad():
        x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1)
        ref_mean, ref_std = reference.encode(x)
    mean, std = np.split(moments, 2, axis=1)
    np.testing.assert_allclose(mean, ref_mean.numpy(), atol=2e-5)
    np.testing.assert_allclose(std, ref_std.numpy(), atol=2e-5)
    norm = published_norm(str(path))
    np.testing.assert_allclose(np.ravel(norm.mean), np.linspace(-1, 1, 8), rtol=1e-6)
    np.testing.assert_allclose(np.ravel(norm.std), np.linspace(0.5, 2, 8), rtol=1e-6)
    assert read_manifest(out)["latent_stats"] == stats

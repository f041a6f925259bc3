"""Channel-wise latent normalisation (LightningDiT / REPA-E): the space's round trip, the
preprocessed set's exact statistics, the step on normalised latents, a recipe's latent space
and the mismatches refused, and a tiny run trained and sampled on normalised latents."""

import dataclasses
import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import repa_eqx.data.writer as pre
from repa_cli.main import app
from repa_eqx.core.errors import ConfigError
from repa_eqx.core.pytree import flatten
from repa_eqx.data.shards import read_manifest
from repa_eqx.pretrained.registry import load_vae, locate
from repa_eqx.runs.load import SamplingModel
from repa_eqx.runs.sample import decoding_space
from repa_eqx.spaces import LatentNorm, VAELatents, default_decoder, published_norm, space_of
from repa_eqx.training.recipe import RecipeError, parse_recipe, sit_config
from repa_eqx.training.step import StepConfig, init_state, make_optimizer, make_train_step

runner = CliRunner()
NORM = LatentNorm("dataset", (0.3, -0.2, 0.1, 0.05), (1.5, 0.7, 2.0, 0.9), multiplier=0.8)


def _all_moments(out: Path) -> np.ndarray:
    shards = read_manifest(out)["shards"]
    return np.concatenate([np.load(out / s["path"] / "moments.npy") for s in shards])


def test_normalise_then_denormalise_decodes_as_the_raw_latents(vae_folder):
    """encode -> normalise -> denormalise -> decode equals encode -> decode."""
    vae = load_vae(str(vae_folder))
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), np.uint8)
    space = VAELatents(NORM, vae)
    moments = space.encode(images)
    mean = jnp.split(moments, 2, axis=1)[0]
    x = space.normalise(moments)  # no key: the posterior mean
    stats = [jnp.asarray(v, jnp.float32).reshape(1, 4, 1, 1) for v in (NORM.mean, NORM.std)]
    np.testing.assert_allclose(x, (mean - stats[0]) / stats[1] * 0.8, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(NORM.denormalise(x), mean, rtol=1e-6, atol=1e-6)
    decode = eqx.filter_jit(lambda vae, z: jax.vmap(vae.decode)(z))
    raw = decode(vae, mean)
    again = decode(vae, NORM.denormalise(x))
    np.testing.assert_allclose(again, raw, atol=1e-5)
    pixels = space.decode(x).astype(np.int16)
    reference = np.clip(255 * (np.asarray(raw) + 1) / 2, 0, 255).astype(np.uint8)
    assert np.abs(pixels - reference.transpose(0, 2, 3, 1)).max() <= 1
    # A posterior sample: normalised channel-wise, the same noise as SD's path draws.
    key = jax.random.key(3)
    std = jnp.split(moments, 2, axis=1)[1]
    z = mean + std * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(
        space.normalise(moments, key=key), (z - stats[0]) / stats[1] * 0.8, rtol=1e-6, atol=1e-6
    )


def test_matches_lightningdit_and_repa_e_normalisation():
    """Our transcription in torch of LightningDiT's (img_latent_dataset.py, inference.py) and
    REPA-E's (train_ldm_only.sample_posterior, utils.denormalize_latents) normalisation, the
    same posterior noise fed to both."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)
    std = rng.uniform(0.1, 1.0, (3, 4, 5, 5)).astype(np.float32)
    eps = rng.normal(size=mean.shape).astype(np.float32)
    z = torch.from_numpy(mean) + torch.from_numpy(std) * torch.from_numpy(eps)
    m = torch.tensor(NORM.mean, dtype=torch.float32).view(1, 4, 1, 1)
    s = torch.tensor(NORM.std, dtype=torch.float32).view(1, 4, 1, 1)
    lightning = (z - m) / s * NORM.multiplier
    repa_e = (z - m) * (1 / s)  # latents_bias = mean, latents_scale = 1 / std
    ours = NORM.normalise(jnp.asarray(mean + std * eps))
    plain = dataclasses.replace(NORM, multiplier=1.0)
    gap = lambda a, b: float(np.abs(np.asarray(a) - b.numpy()).max())
    diffs = [
        gap(ours, lightning),
        gap(plain.normalise(jnp.asarray(z.numpy())), repa_e),
        gap(NORM.denormalise(ours), (lightning * s) / NORM.multiplier + m),
        gap(plain.denormalise(jnp.asarray(repa_e.numpy())), repa_e / (1 / s) + m),
    ]
    print("max abs diff vs LightningDiT / REPA-E (normalise, denormalise):", diffs)
    assert max(diffs) < 1e-6, diffs


def test_manifest_statistics_are_exact_over_every_shard(dataset):
    """mean_c = E[mu], std_c^2 = Var(mu) + E[sigma^2] over all examples and positions, as
    numpy computes them from the shards (two workers and resumed runs are byte-identical
    to this set: test_preprocess)."""
    manifest = read_manifest(dataset)
    stats = manifest["latent_stats"]
    moments = _all_moments(dataset).astype(np.float64)
    mu, sigma = np.split(moments, 2, axis=1)
    np.testing.assert_allclose(stats["mean"], mu.mean(axis=(0, 2, 3)), rtol=1e-13, atol=1e-15)
    expected = np.sqrt(mu.var(axis=(0, 2, 3)) + (sigma**2).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats["std"], expected, rtol=1e-13)
    assert stats["count"] == len(moments) == manifest["num_examples"]
    assert stats["values_per_channel"] == mu.size // 4
    assert manifest["latent_space"] == space_of(manifest["vae"]["source"])
    # Normalised by them, posterior samples of the whole set have mean 0 and std 1 per channel.
    norm = LatentNorm.from_arrays("dataset", stats["mean"], stats["std"])
    keys = jax.random.split(jax.random.key(0), 200)
    stored = jnp.asarray(moments, jnp.float32)
    x = np.asarray(jax.jit(jax.vmap(lambda k: VAELatents(norm).normalise(stored, key=k)))(keys))
    np.testing.assert_allclose(x.mean(axis=(0, 1, 3, 4)), 0, atol=0.02)
    np.testing.assert_allclose(x.std(axis=(0, 1, 3, 4)), 1, atol=0.02)


def test_shards_without_sums_get_the_same_statistics(dataset, tmp_path):
    """`finalize` computes the sums of shards written before they were recorded."""
    out = tmp_path / "old"
    shutil.copytree(dataset, out)
    for record in out.glob("shards/*/shard.json"):
        old = json.loads(record.read_text())
        del old["latent_sums"]
        record.write_text(json.dumps(old))
    assert pre.finalize(out)["latent_stats"] == read_manifest(dataset)["latent_stats"]


@pytest.mark.slow  # two compiles of the step: 20-80 s on 2 shared cores
def test_step_on_moments_normalises_channel_wise():
    """With a zero posterior std, the step on `moments` equals the step on the normalised
    mean (to rounding)."""
    recipe = parse_recipe(
        {
            "model": dict(arch="SiT-S/2", depth=1, hidden_size=32, num_heads=2, encoder_depth=1,
                          input_size=4, in_channels=4, num_classes=3, projector_dim=16),
            "data": {"dataset": "imagenet-latents", "path": "unused"},
        }
    )  # fmt: skip
    optimizer = make_optimizer(recipe)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        state = init_state(sit_config(recipe, 3), [], 16, optimizer, seed=0)
        arrays, static = eqx.partition(state, eqx.is_array)
        cfg = StepConfig("linear", "uniform", 0.0, 0.9, "fp32", latent_norm=NORM)
        step = make_train_step(optimizer, cfg, static, ())
        mean = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
        y = np.array([0, 2])
        moments = np.concatenate([mean, np.zeros_like(mean)], axis=1)
        x = np.asarray(NORM.normalise(jnp.asarray(mean)))
        copy = jax.tree.map(lambda a: a.copy(), arrays)
        a, ma = step(arrays, {"moments": moments, "y": y}, ())
        b, mb = step(copy, {"x": x, "y": y}, ())
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    flat_a, flat_b = flatten(eqx.combine(a, static)), flatten(eqx.combine(b, static))
    for name in flat_a:
        np.testing.assert_allclose(flat_a[name], flat_b[name], rtol=1e-5, atol=1e-9, err_msg=name)


def test_published_statistics_are_read_from_the_vae_config(vae_folder, tmp_path):
    folder = tmp_path / "published"
    shutil.copytree(vae_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 3.0, 4.0]}
    (folder / "config.json").write_text(json.dumps(config))
    norm = published_norm(str(folder), 0.5)
    assert locate(str(folder)).config.get("latents_mean") == list(norm.mean)
    assert norm == LatentNorm("published", (0.1, 0.2, 0.3, 0.4), (1.0, 2.0, 3.0, 4.0), 0.5)
    with pytest.raises(ConfigError, match="publishes no latents_mean"):
        published_norm(str(vae_folder))
    with pytest.raises(ConfigError, match="std > 0"):
        LatentNorm("dataset", (0.0,), (0.0,))


def test_sd_vae_encoder_and_decoder_share_a_space(vae_folder, tmp_path):
    assert space_of("stabilityai/sd-vae-ft-mse") == space_of("stabilityai/sd-vae-ft-ema")
    assert space_of("stabilityai/sd-vae-ft-ema") != space_of("REPA-E/e2e-vavae-hf")
    assert default_decoder("stabilityai/sd-vae-ft-mse") == "stabilityai/sd-vae-ft-ema"
    assert default_decoder(str(vae_folder)) == str(vae_folder)
    copy = tmp_path / "copy"
    shutil.copytree(vae_folder, copy)
    assert space_of(str(vae_folder)) == space_of(copy) == locate(str(copy)).tag()
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert space_of(copy) != space_of(str(vae_folder))


def _model(in_channels: int, latents: dict | None) -> SamplingModel:
    from repa_eqx.model.sit import SiT, SiTConfig

    config = SiTConfig.from_name(
        "SiT-S/2", depth=1, hidden_size=32, num_heads=2, encoder_depth=1, input_size=4,
        in_channels=in_channels, num_classes=3,
    )  # fmt: skip
    sit = eqx.filter_eval_shape(SiT, config, key=jax.random.key(0))
    return SamplingModel(sit, "linear", True, Path("RUN"), 1, latents)


def test_decoding_space_refuses_another_space_and_channel_count(vae_folder):
    latents = {
        "space": space_of(str(vae_folder)),
        "encoder": str(vae_folder),
        "decoder": str(vae_folder),
        "norm": "dataset",
        "scale": None,
        "stats": dataclasses.asdict(NORM),
    }
    with pytest.raises(ConfigError) as error:
        decoding_space(_model(4, latents), "stabilityai/sd-vae-ft-ema")
    message = str(error.value)
    assert "'sd-vae'" in message and str(vae_folder) in message and "\n" not in message
    space, decoder = decoding_space(_model(4, latents))
    assert isinstance(space, VAELatents) and space.norm == NORM and decoder == str(vae_folder)
    with pytest.raises(ConfigError, match="decodes 4-channel latents, but RUN samples 8"):
        decoding_space(_model(8, latents))


def _recipe_file(tmp_path: Path, dataset: Path, data: str, steps: int = 4) -> Path:
    recipe = tmp_path / "latents.toml"
    recipe.write_text(
        f"""
[model]
arch = "SiT-S/2"
depth = 1
hidden_size = 32
num_heads = 2
encoder_depth = 1
input_size = 4
in_channels = 4
num_classes = 3
[data]
dataset = "imagenet-latents"
path = "{dataset}"
batch_size = 4
{data}
[train]
steps = {steps}
log_every = 2
checkpoint_every = {steps}
sample_every = {steps}
sample_steps = 2
num_samples = 3
[output]
dir = "{tmp_path / "run"}"
"""
    )
    return recipe


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            'latent_space = "stabilityai/sd-vae-ft-mse"',
            "recipe key 'data.latent_space': 'stabilityai/sd-vae-ft-mse' is latent space "
            "'sd-vae', but the shards in",
        ),
        ("latent_space = '{vae}'\nvae = 'stabilityai/sd-vae-ft-ema'", "recipe key 'data.vae'"),
        ("latent_multiplier = 2.0", "recipe key 'data.latent_multiplier' applies to"),
        ("latent_norm = 'published'", "publishes no latents_mean"),
    ],
)
def test_recipe_mismatches_are_one_line(dataset, vae_folder, tmp_path, data, message):
    recipe = _recipe_file(tmp_path, dataset, data.replace("{vae}", str(vae_folder)))
    result = runner.invoke(app, ["train", str(recipe), "--no-progress"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run" / "checkpoints").is_dir() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_pixel_datasets_take_no_latent_keys():
    with pytest.raises(RecipeError, match="'mnist-5k' is in pixel space"):
        parse_recipe({"data": {"dataset": "mnist-5k", "latent_norm": "dataset"}})
    with pytest.raises(RecipeError, match="'data.latent_multiplier' must be > 0"):
        parse_recipe({"data": {"path": "x", "latent_norm": "dataset", "latent_multiplier": 0.0}})


def test_dataset_norm_needs_the_manifest_statistics(dataset, tmp_path):
    from repa_eqx.training import train

    out = tmp_path / "old"
    shutil.copytree(dataset, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["latent_stats"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    recipe = parse_recipe(
        {
            "model": dict(arch="SiT-S/2", depth=1, hidden_size=32, num_heads=2, encoder_depth=1,
                          input_size=4, in_channels=4, num_classes=3),
            "data": {"dataset": "imagenet-latents", "path": str(out), "latent_norm": "dataset"},
            "output": {"dir": str(tmp_path / "run")},
        }
    )  # fmt: skip
    with pytest.raises(RecipeError, match="has no latent_stats .* `repa preprocess --finalize`"):
        train(recipe, progress=False)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_train_and_sample_on_dataset_normalised_latents(dataset, vae_folder, tmp_path):
    """A tiny run on channel-normalised latents: the run, its export and `repa sample` carry
    the manifest's statistics and decode with the run's VAE; another VAE is refused."""
    data = f"latent_space = '{vae_folder}'\nlatent_norm = 'dataset'\nlatent_multiplier = 0.5"
    recipe = _recipe_file(tmp_path, dataset, data)
    result = runner.invoke(app, ["train", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    latents = json.loads((run / "latents.json").read_text())
    stats = read_manifest(dataset)["latent_stats"]
    assert latents["stats"] == {
        "source": "dataset", "mean": stats["mean"], "std": stats["std"], "multiplier": 0.5
    }  # fmt: skip
    assert latents["decoder"] == str(vae_folder) and (run / "samples.png").is_file()
    result = runner.invoke(
        app,
        ["sample", "--ckpt", str(run), "--num", "2", "--steps", "2", "--out",
         str(tmp_path / "s"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape == (2, 32, 32, 3)
        card = json.loads(str(npz["card"]))
    assert card["decoder"] == str(vae_folder) and card["latents"] == latents

    from repa_eqx.runs.export import export_run

    export = export_run(run, tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    assert config["latents"] == latents and config["vae"] == str(vae_folder)
    assert "normalised channel-wise" in (export / "README.md").read_text()

    other = tmp_path / "other_vae"  # the same weights, another config: another VAE
    shutil.copytree(vae_folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"force_upcast": False}))
    result = runner.invoke(
        app,
        ["sample", "--from-hub", str(export), "--vae", str(other), "--num", "2", "--steps",
         "2", "--out", str(tmp_path / "s2"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1 and "was trained on" in result.output, result.output
    assert str(other) in result.output and len(result.output.strip().splitlines()) == 1

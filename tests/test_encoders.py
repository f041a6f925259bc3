"""Target encoders picked from the checkpoint's config; several encoders, several projectors."""

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from repa_eqx.data.datasets import ImageDataset
from repa_eqx.data.features import precompute_features
from repa_eqx.pretrained import clip, dinov2, mae
from repa_eqx.training.loop import load_encoders, train
from repa_eqx.training.objective import Terms, repa_objective
from repa_eqx.training.recipe import EncoderSpec, RecipeError, parse_recipe, sit_config
from repa_eqx.training.step import init_state, make_optimizer

pytestmark = pytest.mark.standard_promotion

GRID = 4  # the tiny SiT's token grid: 32 px / patch 8
TINY = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random checkpoints saved by transformers: family -> (folder, resolution for GRID)."""
    torch.manual_seed(0)
    models = {
        "dinov2": (
            transformers.Dinov2Model(
                transformers.Dinov2Config(hidden_size=32, patch_size=14, image_size=56, **TINY)
            ),
            56,
        ),
        "clip": (
            transformers.CLIPModel(
                transformers.CLIPConfig(
                    vision_config=dict(hidden_size=48, patch_size=14, image_size=28, **TINY),
                    text_config=dict(hidden_size=16, **TINY),
                )
            ),
            56,
        ),
        "clip_vision_model": (
            transformers.CLIPVisionModel(
                transformers.CLIPVisionConfig(hidden_size=48, patch_size=14, image_size=28, **TINY)
            ),
            56,
        ),
        "vit_mae": (
            transformers.ViTMAEModel(
                transformers.ViTMAEConfig(hidden_size=40, patch_size=16, image_size=32, **TINY)
            ),
            64,
        ),
    }
    out = {}
    for family, (model, resolution) in models.items():
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (str(folder), resolution)
    return out


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    """Grey 32-px uint8 images, like the MNIST set the tiny runs train on."""
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)


@pytest.mark.parametrize(
    "family, cls, encode, dim",
    [
        ("dinov2", dinov2.Dinov2, dinov2.encode, 32),
        ("clip", clip.ClipVision, clip.encode, 48),
        ("clip_vision_model", clip.ClipVision, clip.encode, 48),
        ("vit_mae", mae.Mae, mae.encode, 40),
    ],
)
def test_family_from_model_type(folders, family, cls, encode, dim):
    folder, resolution = folders[family]
    (encoder,) = load_encoders([EncoderSpec(id=folder, resolution=resolution)], grid=GRID)
    assert type(encoder.model) is cls
    assert encoder.model.grid == GRID and encoder.dim == dim
    images = jnp.asarray(_images())
    features = encoder(images)
    assert features.shape == (2, GRID * GRID, dim)
    np.testing.assert_array_equal(features, encode(encoder.model, images, resolution))


def test_wrong_resolution_names_the_recipe_key(folders):
    specs = [EncoderSpec(id=folders["dinov2"][0], resolution=56)]
    specs.append(EncoderSpec(id=folders["vit_mae"][0], resolution=56))  # patch 16: 3.5x3.5
    with pytest.raises(RecipeError) as error:
        load_encoders(specs, grid=GRID)
    assert str(error.value) == (
        "recipe key 'encoders[1].resolution': 56 px gives a 3.5x3.5 grid of 16-px patches, "
        "but the SiT has 4x4 tokens (use 64)"
    )


def test_unknown_model_type_names_the_recipe_key(folders, tmp_path):
    folder, _ = folders["vit_mae"]
    shutil.copy(Path(folder) / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(RecipeError, match=r"'encoders\[0\].id': .* is a 'vit' model"):
        load_encoders([EncoderSpec(id=str(tmp_path))], grid=GRID)


def test_precomputed_features_of_each_encoder(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path))
    specs = [EncoderSpec(id=folders[f][0], resolution=folders[f][1]) for f in ("clip", "vit_mae")]
    encoders = load_encoders(specs, grid=GRID)
    images = _images(5)
    dataset = ImageDataset("tiny", images, np.zeros(5, np.int32), 1)
    first = precompute_features(encoders, dataset, batch_size=2, progress=False)
    assert len(list((tmp_path / "features").iterdir())) == 2  # one cache file per encoder
    for enc, feats in zip(encoders, first, strict=True):
        assert feats.dtype == np.float16
        np.testing.assert_allclose(feats, enc(jnp.asarray(images)), atol=2e-3, rtol=2e-3)
    again = precompute_features(encoders, dataset, progress=False)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    files = sorted((tmp_path / "features").iterdir())
    whole = [f.read_bytes() for f in files]
    for cached in files:  # truncated by a crash: computed again, and the file rewritten
        cached.write_bytes(cached.read_bytes()[:100])
    recomputed = precompute_features(encoders, dataset, batch_size=2, progress=False)
    for a, b in zip(first, recomputed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [f.read_bytes() for f in files] == whole


def _two_encoder_recipe(out, folders, **train):
    return parse_recipe(
        {
            "model": dict(
                arch="SiT-S/8",
                depth=2,
                hidden_size=32,
                num_heads=2,
                encoder_depth=1,
                input_size=32,
                in_channels=1,
                num_classes=10,
                projector_dim=64,
            ),
            "encoders": [
                {"id": folders["dinov2"][0], "resolution": 56},
                {"id": folders["clip"][0], "resolution": 56},
            ],
            "data": {"dataset": "mnist-5k", "batch_size": 4},
            "train": dict(sample_every=1000, sample_steps=2, num_samples=10, **train),
            "output": {"dir": str(out)},
        }
    )


def test_two_encoders_two_projectors_two_terms(folders, tmp_path):
    recipe = _two_encoder_recipe(tmp_path, folders)
    encoders = load_encoders(recipe.encoders, grid=GRID)
    state = init_state(
        sit_config(recipe, 10),
        [e.dim for e in encoders],
        recipe.model.projector_dim,
        make_optimizer(recipe),
        seed=0,
    )
    model = state.model
    assert [p.fc3.weight.shape[0] for p in model.projectors] == [32, 48]

    images = _images(4)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    y = jnp.arange(4)
    targets = tuple(e(jnp.asarray(images)) for e in encoders)

    @eqx.filter_jit
    def repa_terms(model):
        def repa(m, t):
            kwargs = dict(path="linear", weighting="uniform", terms=Terms(proj_coeff=0.5))
            return repa_objective(m, x, y, t, jax.random.key(1), **kwargs)[1]["repa_loss"]

        # The same SiT and noise with only encoder i and its projector.
        alone = [
            repa(
                eqx.tree_at(lambda m: m.projectors, model, (model.projectors[i],)),
                targets[i : i + 1],
            )
            for i in range(2)
        ]
        return repa(model, targets), alone

    both, (first, second) = repa_terms(model)
    np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-6)
    assert abs(float(first - second)) > 1e-4  # two different terms, not one counted twice


@pytest.mark.slow
def test_two_encoder_run(folders, tmp_path):
    """Both frozen encoders run inside the jitted train step."""
    recipe = _two_encoder_recipe(tmp_path, folders, steps=100, log_every=1)
    result = train(recipe, progress=False, stop_after=1)
    assert result.step == 1 and np.isfinite(result.last["repa_loss"])

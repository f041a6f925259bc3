"""`repa convert`: each family converts once into a cached pytree that loads back identical,
from a folder, a Hub cache (offline) or an official checkpoint; failures leave nothing."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx import WeightsMismatch
from repa_eqx.pretrained import PretrainedNotFound, registry
from repa_eqx.pretrained.registry import convert, load_converted

pytestmark = pytest.mark.standard_promotion

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save(kind: str, folder):
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "dinov2":
        config = transformers.Dinov2Config(**vit, patch_size=14, image_size=56)
        model = transformers.Dinov2Model(config)
    elif kind == "clip":
        config = transformers.CLIPVisionConfig(**vit, patch_size=14, image_size=56)
        model = transformers.CLIPVisionModel(config)
    elif kind == "mae":
        config = transformers.ViTMAEConfig(**vit, patch_size=16, image_size=64)
        model = transformers.ViTMAEModel(config)
    else:
        model = diffusers.AutoencoderKL(
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
    _randomised(model).save_pretrained(folder)
    return folder


def _same(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _doubled(folder):
    """Change the converted copy in `folder`: every float tensor times two."""
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 2 if v.dtype.kind == "f" else v for k, v in tensors.items()}, weights)


def _differs(a, b) -> bool:
    return any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    ("kind", "family", "loader"),
    [
        ("dinov2", "dinov2", registry.load_dinov2),
        ("clip", "clip-vision", registry.load_clip_vision),
        ("mae", "vit-mae", registry.load_mae),
        ("vae", "sd-vae", registry.load_vae),
    ],
)
def test_each_family_converts_once_and_loads_back_identical(tmp_path, kind, family, loader):
    folder = _save(kind, tmp_path / kind)
    reference = loader(str(folder))  # from the safetensors: nothing is converted yet
    out = convert(str(folder))
    header = json.loads((out / "config.json").read_text())
    assert header["family"] == family and header["revision"].startswith("local-")
    _same(load_converted(out), reference)
    # The loader reads the conversion cache once it holds this source at this revision.
    _doubled(out)
    assert _differs(loader(str(folder)), reference)
    _same(loader(str(folder)), load_converted(out))
    # A second conversion is a cache hit; --force writes it again.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert(str(folder)) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert convert(str(folder), force=True) == out
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    _same(loader(str(folder)), reference)


def test_hub_id_offline_from_the_cache_is_versioned_by_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = _save("dinov2", tmp_path / "dinov2")
    commit = "1" * 40
    cached = tmp_path / "hub" / "models--someone--dino"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    shutil.copytree(folder, cached / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = convert("someone/dino")
    assert out.name == commit and out.parent.name == "someone--dino"
    _same(load_converted(out), load_converted(convert(str(folder))))
    with pytest.raises(PretrainedNotFound, match="not in the Hub cache"):
        convert("someone/never-downloaded")


@pytest.mark.parametrize("reg", [False, True])
def test_official_checkpoint(tmp_path, reg):
    """A REPA checkpoint, and a REG one (a SiT with its CLS token), through the cache."""
    from repa_eqx.model.repa import REPAModel
    from repa_eqx.pretrained.official import export_official, load_official, official_config

    args = dict(
        model="SiT-S/2", depth=2, hidden_size=32, num_heads=2, resolution=64, num_classes=10,
        encoder_depth=1, projector_dim=16, projector_embed_dims="24",
    )  # fmt: skip
    if reg:
        args["cls_token_dim"] = 24
    config, z_dims, projector_dim = official_config(args)
    assert config.cls_dim == (24 if reg else 0)
    model = REPAModel(config, z_dims, projector_dim, key=jax.random.key(1))
    pt = next(f for f in export_official(model, tmp_path / "repa", args=args) if f.suffix == ".pt")
    reference, info = load_official(pt)
    out = convert(str(pt))
    assert json.loads((out / "config.json").read_text())["family"] == "repa-sit"
    _same(load_converted(out), reference)
    # load_official reads the conversion of the same file and args, not other args.
    _doubled(out)
    converted, cached_info = load_official(pt)
    assert _differs(converted, reference) and cached_info.args == info.args
    _same(converted, load_converted(out))
    assert not _differs(load_official(pt, use_ema=False)[0], reference)


def test_a_mismatched_checkpoint_writes_nothing(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _save("dinov2", tmp_path / "dinov2")
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    tensors.pop("layernorm.bias")
    save_file(tensors, weights)
    with pytest.raises(WeightsMismatch, match="missing: layernorm.bias"):
        convert(str(folder))
    assert not list((tmp_path / "cache").rglob("model.safetensors"))


def test_cli(tmp_path, monkeypatch):
    folder = _save("vae", tmp_path / "vae")
    result = runner.invoke(app, ["convert", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("sd-vae from ")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    for source, message in (
        ("someone/absent", "is not in the Hub cache and the Hub cannot be reached"),
        (str(tmp_path / "empty"), "holds no config.json"),
    ):
        result = runner.invoke(app, ["convert", source])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1

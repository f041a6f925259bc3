"""LightningDiT's switches of our SiT against a PyTorch transcription of the reference
(benchmarks/torch_lightningdit.py, random weights, float32 on CPU), its state-dict layout both
ways, and its checkpoint files loaded without torch."""

import dataclasses
import sys
import tomllib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx.core.errors import ConfigError
from repa_eqx.model.sit import SiT, SiTConfig, apply_rope, rope_tables, unstack_blocks
from repa_eqx.pretrained import PretrainedNotFound, WeightsMismatch, convert, load_converted
from repa_eqx.pretrained.lightningdit import (
    from_lightningdit_state_dict,
    is_lightningdit_checkpoint,
    lightningdit_config,
    lightningdit_state_dict,
    load_lightningdit,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import torch_lightningdit as tl  # noqa: E402

pytestmark = pytest.mark.standard_promotion  # the SiT adds biases by rank promotion

TINY = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
# (use_swiglu, use_rmsnorm, use_rope, use_qknorm, wo_shift): the released models' set, it
# with q/k RMSNorm, SiT's block with q/k LayerNorm and no shifts, and each switch alone.
SWITCHES = {
    "released": (True, True, True, False, False),
    "released+qknorm": (True, True, True, True, False),
    "layernorm-qknorm-woshift": (False, False, False, True, True),
    "rope": (False, False, True, False, False),
    "swiglu": (True, False, False, False, False),
    "rmsnorm": (False, True, False, False, False),
}
FLAGS = ("use_swiglu", "use_rmsnorm", "use_rope", "use_qknorm", "wo_shift")


def _torch_model(switches, patch_size=1, seed=0) -> tl.LightningDiT:
    torch.manual_seed(seed)
    model = tl.LightningDiT(
        patch_size=patch_size, **TINY, **dict(zip(FLAGS, switches, strict=True))
    )
    with torch.no_grad():  # every weight random, the zero-initialised and norm ones too
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def _config(tensors, switches) -> SiTConfig:
    """The heads are read from the q/k norms or the RoPE table; else (no named size) a hint."""
    _, _, rope, qk_norm, _ = switches
    return lightningdit_config(tensors, **({} if rope or qk_norm else {"num_heads": 4}))


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    t = torch.rand(n, generator=g)
    y = torch.tensor([0, 3, TINY["num_classes"]])[:n]  # the null class too
    return x, t, y


def _random(skeleton, seed: int = 0):
    """Every weight of a module skeleton random (SiT's zero-initialised and unit norm ones
    too); no eager init."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        offset = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(offset + 0.2 * rng.normal(size=shape.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, skeleton)


def _random_sit(config: SiTConfig) -> SiT:
    return _random(eqx.filter_eval_shape(SiT, config, key=jax.random.key(0)))


@eqx.filter_jit
def _velocity(sit: SiT, x, t, y):
    return jax.vmap(lambda a, b, c: sit(a, b, c)[0])(x, t, y)


def _ours(sit: SiT, x, t, y) -> np.ndarray:
    return np.asarray(_velocity(sit, *(jnp.asarray(a.numpy()) for a in (x, t, y))))


def test_rope_matches_reference_tables_and_rotation():
    cos, sin = rope_tables(16, 5)
    ref = tl.Rope2d(8, 5)
    np.testing.assert_allclose(cos, ref.freqs_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ref.freqs_sin.numpy(), atol=1e-6)
    q = np.random.default_rng(0).normal(size=(25, 3, 16)).astype(np.float32)
    ours = apply_rope(jnp.asarray(q), cos, sin)
    theirs = ref(torch.from_numpy(q).transpose(0, 1)).transpose(0, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6)
    # Rotations keep norms, and relative: q.k depends on the offset alone (row shift by 1).
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(ours), axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5
    )


@pytest.mark.parametrize("name", list(SWITCHES))
def test_block_matches_reference(name):
    model = _torch_model(SWITCHES[name])
    config = _config(_state_dict(model), SWITCHES[name])
    sit, _ = from_lightningdit_state_dict(_state_dict(model), config)
    block = unstack_blocks(sit.blocks)[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 64, generator=g)
    c = torch.randn(2, 64, generator=g)
    with torch.no_grad():
        theirs = model.blocks[0](x, c, model.feat_rope).numpy()
    run = eqx.filter_jit(lambda b, x, c: jax.vmap(b)(x, c))
    ours = np.asarray(run(block, jnp.asarray(x.numpy()), jnp.asarray(c.numpy())))
    diff = float(np.abs(ours - theirs).max())
    assert diff < 2e-5 * max(1.0, float(np.abs(theirs).max())), (name, diff)


# The released set and the one with every other switch run by default; the rest are slow.
DEFAULT = ("released", "layernorm-qknorm-woshift")


@pytest.mark.parametrize(
    ("name", "patch_size"),
    [
        pytest.param(n, p, marks=() if n in DEFAULT and p == 1 else pytest.mark.slow)
        for n, p in [(n, 1) for n in SWITCHES] + [("released", 2)]
    ],
)
def test_model_matches_reference(name, patch_size):
    model = _torch_model(SWITCHES[name], patch_size)
    tensors = _state_dict(model)
    config = _config(tensors, SWITCHES[name])
    expected = dict(
        zip(("mlp", "norm", "rope", "qk_norm", "wo_shift"), SWITCHES[name], strict=True)
    )
    expected["mlp"] = "swiglu" if expected["mlp"] else "gelu"
    expected["norm"] = "rmsnorm" if expected["norm"] else "layernorm"
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.patch_size, config.num_heads, config.data_at_t1) == (patch_size, 4, True)
    x, t, y = _inputs()
    with torch.no_grad():
        theirs = model(x, t, y).numpy()
    scale = max(1.0, float(np.abs(theirs).max()))
    # In the reference's time here; REPA's time (data_at_t1) is checked on checkpoint files.
    own_time = dataclasses.replace(config, data_at_t1=False)
    sit, pos_diff = from_lightningdit_state_dict(tensors, own_time)
    assert pos_diff is not None and pos_diff < 1e-6
    diff = float(np.abs(_ours(sit, x, t, y) - theirs).max())
    assert diff < 2e-5 * scale, (name, diff)


def test_state_dict_round_trip_into_the_reference():
    """Ours (random init, then perturbed) under LightningDiT's names loads strictly into the
    reference and gives the same output."""
    config = SiTConfig.from_name("LightningDiT-S/1", **TINY, encoder_depth=1, qk_norm=True)
    sit = _random_sit(config)
    tensors = lightningdit_state_dict(sit)
    model = tl.LightningDiT(
        patch_size=1, **TINY, **dict(zip(FLAGS, SWITCHES["released+qknorm"], strict=True))
    )
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    x, t, y = _inputs()
    with torch.no_grad():
        theirs = model.eval()(x, t, y).numpy()
    own_time = dataclasses.replace(config, data_at_t1=False)
    back, _ = from_lightningdit_state_dict(tensors, own_time)
    np.testing.assert_allclose(_ours(back, x, t, y), theirs, atol=5e-5, rtol=1e-4)


def test_mismatch_names_every_bad_tensor():
    tensors = _state_dict(_torch_model(SWITCHES["released"]))
    config = lightningdit_config(tensors)
    with pytest.raises(WeightsMismatch, match="unexpected: feat_rope.freqs_cos") as e:
        from_lightningdit_state_dict(tensors, dataclasses.replace(config, rope=False))
    assert "\n" not in str(e.value)
    del tensors["blocks.1.norm2.weight"]
    with pytest.raises(WeightsMismatch, match="missing: blocks.1.norm2.weight"):
        from_lightningdit_state_dict(tensors, config)
    tensors = _state_dict(_torch_model(SWITCHES["released"]))
    tensors["feat_rope.freqs_cos"] = tensors["feat_rope.freqs_cos"][::-1].copy()
    with pytest.raises(WeightsMismatch, match="not the 2-D rotary table"):
        from_lightningdit_state_dict(tensors, config)


def test_names_and_switch_validation():
    xl1 = SiTConfig.from_name("LightningDiT-XL/1", input_size=16, in_channels=32)
    assert (xl1.depth, xl1.hidden_size, xl1.num_heads, xl1.patch_size) == (28, 1152, 16, 1)
    assert (xl1.mlp, xl1.norm, xl1.rope, xl1.qk_norm, xl1.wo_shift) == (
        "swiglu",
        "rmsnorm",
        True,
        False,
        False,
    )
    assert xl1.mlp_hidden == 3072 and xl1.num_tokens == 256  # DINOv2 at 224 px: 16x16
    sit_xl1 = SiTConfig.from_name("SiT-XL/1", input_size=16, in_channels=32)
    assert sit_xl1 == dataclasses.replace(xl1, mlp="gelu", norm="layernorm", rope=False)
    assert SiTConfig.from_name("LightningDiT-1p6B/2").hidden_size == 1792
    for bad, message in (
        (dict(mlp="relu"), "mlp 'relu'"),
        (dict(norm="batchnorm"), "norm 'batchnorm'"),
        (dict(rope=True, hidden_size=72, num_heads=4), "head dim divisible by 4"),
        (dict(rope=True, cls_dim=8), "CLS token"),
        (dict(data_at_t1=True, learn_sigma=True), "data_at_t1"),
    ):
        with pytest.raises(ConfigError, match=message):
            SiTConfig(**bad)


@pytest.mark.slow
def test_bf16_forward_with_every_switch():
    """RoPE, q/k norms and RMSNorms in bf16 through the shared attention path (CPU lowp)."""
    config = SiTConfig.from_name(
        "LightningDiT-S/1", **TINY, encoder_depth=1, qk_norm=True, wo_shift=True
    )
    sit = _random_sit(config)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), sit)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8))
    t, y = jnp.asarray(0.3), jnp.asarray(1)
    full = _velocity(sit, x[None], t[None], y[None])
    half = _velocity(low, x[None], t[None], y[None])
    assert half.dtype == jnp.bfloat16
    err = float(jnp.abs(half.astype(jnp.float32) - full).max() / jnp.abs(full).max())
    assert err < 0.05, err


def _save_checkpoint(path: Path, model, layout: str) -> Path:
    state = model.state_dict()
    if layout == "train.py":  # hustvl/LightningDiT train.py's checkpoint
        saved = {
            "model": {k: v + 1 for k, v in state.items()},  # not what inference.py samples
            "ema": state,
            "opt": {"state": {}, "param_groups": []},
            "config": {"model": {"model_type": "LightningDiT-S/1", "use_rope": True}},
        }
    else:  # a bare EMA state dict, saved from a torch.compile'd model
        saved = {f"_orig_mod.{k}": v for k, v in state.items()}
    torch.save(saved, path)
    return path


@pytest.mark.parametrize("layout", ["train.py", "bare"])
def test_checkpoint_file_torch_free(tmp_path, monkeypatch, layout):
    """A checkpoint file in the released layout: read without torch, through the conversion
    cache (`repa convert`), and picked up by `repa sample`'s loader."""
    from repa_eqx.runs.load import load_for_sampling

    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))
    model = _torch_model(SWITCHES["released"])
    path = _save_checkpoint(tmp_path / "lightningdit-tiny.pt", model, layout)
    assert is_lightningdit_checkpoint(path)
    x, t, y = _inputs()
    with torch.no_grad():
        theirs = model(x, t, y).numpy()
    sit, info = load_lightningdit(path)
    assert info.weights == ("ema" if layout == "train.py" else "state_dict")
    np.testing.assert_allclose(_ours(sit, x, 1 - t, y), -theirs, atol=5e-5, rtol=1e-4)
    folder = convert(str(path))
    assert folder.is_dir() and convert(str(path)) == folder  # a cache hit
    converted = load_converted(folder)
    np.testing.assert_array_equal(_ours(converted, x, 1 - t, y), _ours(sit, x, 1 - t, y))
    sampling = load_for_sampling(path)
    assert sampling.sit.config == sit.config and sampling.sit.config.data_at_t1
    assert sampling.objective == "interpolant"
    if layout == "bare":  # a file in REPA's time (our own export): the hint says so
        own, _ = load_lightningdit(path, data_at_t1=0)
        np.testing.assert_allclose(_ours(own, x, t, y), theirs, atol=5e-5, rtol=1e-4)
        with pytest.raises(ConfigError, match="data_at_t1 must be 0 or 1, got 'no'"):
            load_lightningdit(path, data_at_t1="no")


def _hub_snapshot(hub: Path, repo: str, name: str) -> Path:
    """An offline Hub cache entry of `repo` at one commit: the folder `name` goes in."""
    commit = "3" * 40
    cached = hub / ("models--" + repo.replace("/", "--"))
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    (cached / "snapshots" / commit).mkdir(parents=True)
    return cached / "snapshots" / commit / name


def test_released_id_offline(tmp_path, monkeypatch):
    """`repa convert hustvl/lightningdit-xl-imagenet256-800ep`: from the Hub cache offline;
    not downloaded, one line naming it."""
    from huggingface_hub import constants

    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "hustvl/lightningdit-xl-imagenet256-800ep"
    with pytest.raises(PretrainedNotFound, match=f"'{repo}' is not in the Hub cache") as e:
        convert(repo)
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["convert", repo])
    assert result.exit_code == 1 and repo in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    model = _torch_model(SWITCHES["released"])
    file = _hub_snapshot(tmp_path / "hub", repo, "lightningdit-xl-imagenet256-800ep.pt")
    _save_checkpoint(file, model, "bare")
    result = CliRunner().invoke(app, ["convert", repo])
    assert result.exit_code == 0 and result.output.startswith(f"lightningdit from {repo}")
    folder = convert(repo)
    sit = load_converted(folder)
    x, t, y = _inputs()
    with torch.no_grad():
        theirs = model(x, t, y).numpy()
    np.testing.assert_allclose(_ours(sit, x, 1 - t, y), -theirs, atol=5e-5, rtol=1e-4)


def test_recipe_keys_override_the_arch_and_round_trip(tmp_path):
    from helpers import tiny_recipe

    from repa_eqx.training.recipe import RecipeError, dump_recipe, parse_recipe, sit_config

    model = {"arch": "LightningDiT-S/1", "num_heads": 4, "hidden_size": 32, "rope": False}
    recipe = tiny_recipe(tmp_path, model=model | {"qk_norm": True})
    config = sit_config(recipe)
    assert (config.mlp, config.norm, config.rope, config.qk_norm, config.patch_size) == (
        "swiglu",
        "rmsnorm",
        False,
        True,
        1,
    )
    assert sit_config(parse_recipe(tomllib.loads(dump_recipe(recipe)))) == config
    plain = sit_config(tiny_recipe(tmp_path, model={"mlp": "swiglu", "wo_shift": True}))
    assert (plain.mlp, plain.norm, plain.wo_shift) == ("swiglu", "layernorm", True)
    for bad, message in (
        ({"mlp": "relu"}, "recipe section 'model': mlp 'relu': choose from"),
        ({"rope": "yes"}, "recipe key 'model.rope' must be bool"),
        (
            {"arch": "LightningDiT-S/1", "num_heads": 6, "hidden_size": 36},
            "rope needs a head dim divisible by 4",
        ),
    ):
        with pytest.raises(RecipeError, match=message) as e:
            sit_config(tiny_recipe(tmp_path, model=bad))
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_repa_model_trains_through_every_switch():
    """A REPAModel on a switched SiT, under the training default `remat="dots"`: finite
    gradients reach every new leaf."""
    from repa_eqx.model.repa import REPAModel

    config = SiTConfig.from_name(
        "LightningDiT-S/1", **TINY, encoder_depth=1, qk_norm=True, wo_shift=True
    )
    model = _random(eqx.filter_eval_shape(REPAModel, config, (16,), 32, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(2), (2, 4, 8, 8))
    t, y = jnp.asarray([0.2, 0.7]), jnp.asarray([1, 10])

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(m):
        out, projected = jax.vmap(lambda a, b, c: m(a, b, c, remat="dots"))(x, t, y)
        return jnp.mean(out**2) + jnp.mean(projected[0] ** 2)

    g = grads(model)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(g))
    blocks = g.sit.blocks
    for leaf in (
        blocks.norm1.weight,
        blocks.norm2.weight,
        blocks.q_norm.weight,
        blocks.k_norm.weight,
        g.sit.final_norm.weight,
    ):
        assert float(jnp.abs(leaf).max()) > 0


def test_full_size_xl1_names_and_shapes():
    """LightningDiT-XL/1 as released (16x16x32 latents): every tensor of the reference's
    state dict has its place in ours, with its shape (torch on the meta device: no memory)."""
    from repa_eqx.model.repa import REPAModel
    from repa_eqx.pretrained.official import targets

    with torch.device("meta"):
        reference = tl.LightningDiT(
            input_size=16,
            patch_size=1,
            in_channels=32,
            use_swiglu=True,
            use_rmsnorm=True,
            use_rope=True,
        )
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    config = SiTConfig.from_name("LightningDiT-XL/1", input_size=16, in_channels=32)
    skeleton = eqx.filter_eval_shape(REPAModel, config, (), 1, key=jax.random.key(0))
    ours = {}
    for target in targets(config, 0):
        shape = tuple(target.where(skeleton).shape)
        if isinstance(target.names, str):
            ours[target.names] = shape
        else:
            ours.update(dict.fromkeys(target.names, shape[1:]))
    frozen = {"pos_embed": (1, 256, 1152)} | dict.fromkeys(
        ("feat_rope.freqs_cos", "feat_rope.freqs_sin"), (256, 72)
    )
    assert ours | frozen == theirs
    count = sum(int(np.prod(s)) for s in ours.values())
    assert 670e6 < count < 680e6, count  # the paper's 675M


def test_sample_from_the_released_id_offline(tmp_path, monkeypatch):
    """`repa sample --from-hub hustvl/lightningdit-xl-imagenet256-800ep`: the .pt from the
    Hub cache, its samples VA-VAE f16d32 latents with the VAE's published statistics."""
    from huggingface_hub import constants

    from repa_eqx.runs import find_model
    from repa_eqx.runs.load import LIGHTNINGDIT_VAE

    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "hustvl/lightningdit-xl-imagenet256-800ep"
    torch.manual_seed(0)
    model = tl.LightningDiT(
        input_size=4, in_channels=32, hidden_size=32, depth=1, num_heads=2, num_classes=10,
        use_swiglu=True, use_rmsnorm=True, use_rope=True,
    )  # fmt: skip
    weights = _hub_snapshot(tmp_path / "hub", repo, "lightningdit-xl-imagenet256-800ep.pt")
    torch.save(model.state_dict(), weights)
    stats = _hub_snapshot(tmp_path / "hub", LIGHTNINGDIT_VAE, "latents_stats.pt")
    mean, std = torch.linspace(-1, 1, 32).view(1, 32, 1, 1), torch.linspace(1, 2, 32)
    torch.save({"mean": mean, "std": std.view(1, 32, 1, 1)}, stats)
    sampling = find_model(from_hub=repo)
    assert sampling.sit.config.data_at_t1 and sampling.sit.config.in_channels == 32
    latents = sampling.latents
    assert latents["decoder"] == LIGHTNINGDIT_VAE and latents["stats"]["multiplier"] == 1.0
    np.testing.assert_allclose(latents["stats"]["mean"], mean.ravel().numpy(), rtol=1e-6)
    np.testing.assert_allclose(latents["stats"]["std"], std.numpy(), rtol=1e-6)

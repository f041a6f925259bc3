"""DiT: the public checkpoints' layout against an independent PyTorch DiT written below from
DiT's conventions (learned sigma: 2C outputs; the integer step fed to the time embedding),
config inference, mismatch reports, `repa sample` on a DiT file, and a tiny DiT + REPA run."""

import json
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_recipe
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx import WeightsMismatch
from repa_eqx.diffusion.ddpm import Schedule, _at, p_mean_variance, q_sample
from repa_eqx.model.sit import SiT, SiTConfig
from repa_eqx.pretrained.dit import dit_config, dit_state_dict, is_dit_checkpoint, load_dit

pytestmark = pytest.mark.standard_promotion

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

# A tiny DiT: 4x8x8 latents (64 px images), patch 2, 16 tokens; no named size, so the heads
# come from a hint.
TINY = dict(hidden=64, depth=3, heads=4, patch=2, channels=4, grid=4, classes=10)


def torch_dit(seed: int, *, hidden, depth, heads, patch, channels, grid, classes):
    """A DiT as facebookresearch/DiT builds it, modules named as there, every parameter random
    (the zero-initialised adaLN and output layers too)."""

    def sincos(dim: int):
        # MAE's table: first half of the features from the column index, second from the row;
        # sin then cos, frequencies 10000^(-j / (dim / 4)).
        omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

        def axis(pos):
            angles = pos.reshape(-1, 1).double() * omega
            return torch.cat([angles.sin(), angles.cos()], dim=1)

        return torch.cat([axis(cols), axis(rows)], dim=1).float()

    def holder(**modules):
        module = nn.Module()
        for name, child in modules.items():
            module.add_module(name, child)
        return module

    def norm(x):
        return F.layer_norm(x, (hidden,), eps=1e-6)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = holder(qkv=nn.Linear(hidden, 3 * hidden), proj=nn.Linear(hidden, hidden))
            self.mlp = holder(fc1=nn.Linear(hidden, 4 * hidden), fc2=nn.Linear(4 * hidden, hidden))
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

        def forward(self, x, c):
            chunks = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = chunks
            n, tokens, _ = x.shape
            h = norm(x) * (1 + scale_a) + shift_a
            qkv = self.attn.qkv(h).view(n, tokens, 3, heads, hidden // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, hidden)
            x = x + gate_a * self.attn.proj(h)
            h = norm(x) * (1 + scale_m) + shift_m
            return x + gate_m * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = holder(proj=nn.Conv2d(channels, hidden, patch, stride=patch))
            self.t_embedder = holder(
                mlp=nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            )
            self.y_embedder = holder(embedding_table=nn.Embedding(classes + 1, hidden))
            self.pos_embed = nn.Parameter(sincos(hidden)[None], requires_grad=False)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.final_layer = holder(
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)),
                linear=nn.Linear(hidden, patch * patch * 2 * channels),  # learn_sigma
            )

        def forward(self, x, t, y):
            x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
            freqs = torch.exp(-np.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
            angles = t.float()[:, None] * freqs  # t: the integer step 0..999
            c = self.t_embedder.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))
            c = c + self.y_embedder.embedding_table(y)
            for block in self.blocks:
                x = block(x, c)
            shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
            x = self.final_layer.linear(norm(x) * (1 + scale) + shift)
            n, out = x.shape[0], 2 * channels
            x = x.view(n, grid, grid, patch, patch, out).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(n, out, grid * patch, grid * patch)

    model = DiT()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                fan_in = param[0].numel() if param.ndim > 1 else 100
                param.copy_(torch.randn(param.shape, generator=g) * fan_in**-0.5)
    return model.eval()


def _inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    size = TINY["grid"] * TINY["patch"]
    x = rng.standard_normal((batch, TINY["channels"], size, size)).astype(np.float32)
    t = np.array([0, 17, 500, 999][:batch], np.int64)
    y = rng.integers(0, TINY["classes"], size=batch)
    y[-1] = TINY["classes"]  # the null label
    return x, t, y


def _ours(sit: SiT, x, t, y):
    return np.asarray(
        eqx.filter_jit(jax.vmap(lambda x, t, y: sit(x, t, y)[0]))(x, t.astype(np.float32), y)
    )


def _theirs(reference, x, t, y):
    with torch.no_grad():
        return reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


def test_dit_checkpoint_matches_an_independent_torch_dit(tmp_path):
    reference = torch_dit(0, **TINY)
    path = tmp_path / "DiT-S-2-64x64.pt"  # a bare state dict, as released
    torch.save(reference.state_dict(), path)
    assert is_dit_checkpoint(path)

    sit, info = load_dit(path, num_heads=TINY["heads"])
    assert sit.config == SiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
        num_classes=10, encoder_depth=3, learn_sigma=True,
    )  # fmt: skip
    assert info.weights == "state_dict" and info.pos_embed_max_diff < 1e-6
    x, t, y = _inputs()
    ours, theirs = _ours(sit, x, t, y), _theirs(reference, x, t, y)
    assert ours.shape == (4, 8, 8, 8) and np.abs(theirs).max() > 0.5  # 2C channels, not tiny
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

    # Our export goes back into the torch DiT with strict names and shapes.
    fresh = torch_dit(7, **TINY)
    exported = {k: torch.from_numpy(np.array(v)) for k, v in dit_state_dict(sit).items()}
    fresh.load_state_dict(exported, strict=True)
    np.testing.assert_allclose(_theirs(fresh, x, t, y), theirs, rtol=0, atol=1e-6)

    # DiT's train.py checkpoint: {model, ema, opt, args}; "ema" is what sample.py loads.
    trained = torch_dit(1, **TINY)
    args = types.SimpleNamespace(model="DiT-S/2", image_size=64, num_classes=10)
    import argparse

    saved = {"model": trained.state_dict(), "ema": reference.state_dict(), "opt": {},
             "args": argparse.Namespace(**vars(args))}  # fmt: skip
    torch.save(saved, tmp_path / "0001000.pt")
    ema, info = load_dit(tmp_path / "0001000.pt", num_heads=4)
    assert info.weights == "ema"
    np.testing.assert_array_equal(_ours(ema, x, t, y), ours)
    online, _ = load_dit(tmp_path / "0001000.pt", use_ema=False, num_heads=4)
    np.testing.assert_allclose(_ours(online, x, t, y), _theirs(trained, x, t, y), atol=1e-4)


def _xl_shapes(image_size: int, **drop) -> dict:
    """Shape-only stand-ins (no memory) for the tensors of DiT-XL-2-{size}.pt."""
    h, grid = 1152, image_size // 16
    shapes = {
        "x_embedder.proj.weight": (h, 4, 2, 2),
        "y_embedder.embedding_table.weight": (1001, h),
        "pos_embed": (1, grid * grid, h),
        "final_layer.linear.weight": (2 * 2 * 8, h),
        **{f"blocks.{i}.attn.qkv.weight": (3 * h, h) for i in range(28)},
    }
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items() if k not in drop}


def test_config_of_the_released_checkpoints():
    for size, latent in ((256, 32), (512, 64)):
        config = dit_config(_xl_shapes(size), model=f"DiT-XL-2-{size}x{size}.pt")
        assert config == SiTConfig.from_name("DiT-XL/2", input_size=latent)
        assert config.learn_sigma and config.num_classes == 1000 and config.num_heads == 16
    # Without pos_embed the grid comes from the file name.
    no_table = _xl_shapes(512, pos_embed=True)
    assert dit_config(no_table, model="DiT-XL-2-512x512.pt").input_size == 64
    with pytest.raises(ValueError, match="pass image_size"):
        dit_config(no_table)
    with pytest.raises(ValueError, match="no named size: pass num_heads"):
        dit_config({k: v for k, v in _xl_shapes(256).items() if "blocks.27" not in k})


def test_wrong_checkpoint_names_the_tensors(tmp_path):
    state = torch_dit(2, **TINY).state_dict()
    del state["blocks.2.mlp.fc2.bias"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    state["y_embedder.embedding_table.weight"] = torch.zeros(11, 63)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsMismatch) as caught:
        load_dit(path, num_heads=4)
    message = str(caught.value)
    assert "a DiT of depth 3, width 64, patch 2, 10 classes" in message
    assert "missing: blocks.2.mlp.fc2.bias" in message
    assert "unexpected: blocks.0.attn.q_norm.weight" in message
    assert "y_embedder.embedding_table.weight (11, 63) (expected (11, 64))" in message
    # A SiT's checkpoint (C output channels) is not taken for a DiT.
    sit_like = torch_dit(2, **TINY).state_dict()
    sit_like["final_layer.linear.weight"] = sit_like["final_layer.linear.weight"][:16]
    torch.save(sit_like, path)
    assert not is_dit_checkpoint(path)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("vae")
    blocks = dict(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, **blocks
    )
    vae.save_pretrained(folder)
    return folder


def test_sample_command_on_a_dit_checkpoint(tmp_path, tiny_vae):
    path = tmp_path / "DiT-S-2-64x64.pt"
    torch.save(torch_dit(3, **TINY).state_dict(), path)
    runner = CliRunner()
    common = ["sample", "--ckpt", str(path), "--vae", str(tiny_vae), "--num", "3",
              "--official-arg", "num_heads=4", "--no-progress", "--no-png"]  # fmt: skip
    for mode, steps in (("ddpm", "5"), ("ddim", "4")):
        out = tmp_path / mode
        args = [*common, "--mode", mode, "--steps", steps, "--cfg", "1.5", "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"({mode}-{steps}-cfg1.5-0_1)" in result.output
        with np.load(out.with_suffix(".npz")) as npz:
            assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    # The default mode of a DiT is ddpm (250 steps); ode/sde do not apply to it.
    bad = runner.invoke(app, [*common, "--mode", "ode"])
    assert bad.exit_code == 1 and "'ode' and 'sde' a SiT" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_tiny_dit_repa_run_lowers_its_losses(tmp_path, tiny_dinov2):
    from repa_eqx.runs.load import load_run
    from repa_eqx.training.loop import train

    recipe = tiny_recipe(
        tmp_path / "run",
        tiny_dinov2,
        model={"arch": "DiT-S/4"},
        loss={"objective": "ddpm"},
        train={"steps": 60, "log_every": 10, "sample_every": 60, "checkpoint_every": 60},
        data={"precompute_features": True},
        optim={"lr": 2e-3},
    )
    train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["mse_loss"] < 0.7 * first["mse_loss"]
    assert last["repa_loss"] < first["repa_loss"]
    assert last["loss"] < first["loss"]
    for row in rows:
        np.testing.assert_allclose(row["denoise_loss"], row["mse_loss"] + row["vb_loss"], rtol=1e-5)
        np.testing.assert_allclose(row["loss"], row["denoise_loss"] + 0.5 * row["repa_loss"],
                                   rtol=1e-5)  # fmt: skip
    assert (tmp_path / "run/samples.png").is_file()  # drawn by the DDPM sampler

    # The trained model's variance lies between beta-tilde_t and beta_t. As in DiT, v is
    # not clamped to [-1, 1], so the bound holds by construction only for |v| <= 1: v strays
    # past it where the range is nearly empty (at step 999 beta / beta-tilde = 1 + 7e-7), and
    # the variance there leaves the range by a negligible amount.
    model = load_run(tmp_path / "run")
    assert model.objective == "ddpm" and model.default_mode == "ddpm"
    schedule = Schedule.linear()
    k = jnp.array([0, 1, 10, 100, 400, 700, 999] * 2)
    x0 = jax.random.uniform(jax.random.key(0), (14, 1, 32, 32), minval=-1, maxval=1)
    x_k = q_sample(schedule, x0, k, jax.random.normal(jax.random.key(1), x0.shape))
    out = _ours(model.sit, x_k, k, k % 10)
    c = _at(schedule.tables(), k, 4)
    _, log_variance, _ = p_mean_variance(c, jnp.asarray(out), x_k)
    assert np.mean(np.abs(out[:, 1:]) <= 1) > 0.97  # measured: 99.4%
    tolerance = 1e-3  # in log-variance: 0.1% of the variance; measured 2e-4
    assert np.all(log_variance >= c.posterior_log_variance_clipped - tolerance)
    assert np.all(log_variance <= c.log_betas + tolerance)


def test_alignment_features_of_a_dit_see_its_ddpm_noise():
    from repa_eqx.evaluation.representation import _noise, sit_features

    config = SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3,
                       num_heads=2, num_classes=10, encoder_depth=2, learn_sigma=True)  # fmt: skip
    sit = SiT(config, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 1, 8, 8))
    key = jax.random.key(2)
    features = sit_features(sit, x, 0.5, layer=2, key=key, pool=False)
    noise = _noise(key, jnp.arange(3), (1, 8, 8))
    step = jnp.full(3, 500)
    x_k = q_sample(Schedule.linear(), x, step, noise)
    null = jnp.full(3, config.num_classes)
    expected = eqx.filter_jit(jax.vmap(lambda x, t, y: sit(x, t, y)[1]))(x_k, step * 1.0, null)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

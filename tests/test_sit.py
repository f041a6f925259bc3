"""SiT and REPAModel: shapes for every size, the reference's initialisation, label dropout,
the encoder_depth tap, and parity with an independent PyTorch SiT written below."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from repa_eqx.model.repa import REPAModel
from repa_eqx.model.sit import SiT, SiTConfig, sincos_pos_embed_2d

pytestmark = pytest.mark.standard_promotion

# size -> (depth, hidden, heads, REPA encoder_depth), from the SiT / REPA papers.
SIZES = {
    "S": (12, 384, 6, 4),
    "B": (12, 768, 12, 4),
    "L": (24, 1024, 16, 8),
    "XL": (28, 1152, 16, 8),
}


def _tiny(**overrides) -> SiTConfig:
    base = dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=4,
        num_classes=10,
        encoder_depth=1,
    )
    return SiTConfig(**(base | overrides))


def _build(cfg: SiTConfig, z_dims=(16,), projector_dim: int = 32, seed: int = 0) -> REPAModel:
    """The real initialisation, traced once under jit (eager init compiles op by op: slow)."""
    return eqx.filter_jit(lambda key: REPAModel(cfg, z_dims, projector_dim=projector_dim, key=key))(
        jax.random.key(seed)
    )


def _random(
    cfg: SiTConfig, z_dims=(16,), projector_dim: int = 32, seed: int = 0, scale: float = 0.1
) -> REPAModel:
    """Every floating leaf N(0, scale^2), so zero-initialised layers cannot hide bugs. Same
    seed and shapes -> same weights, whatever the static config (e.g. encoder_depth)."""
    skeleton = eqx.filter_eval_shape(
        REPAModel, cfg, z_dims, projector_dim=projector_dim, key=jax.random.key(0)
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), skeleton
    )


@eqx.filter_jit
def _forward(model, x, t, y):
    return jax.vmap(model)(x, t, y)


def _num_elements(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _inputs(cfg: SiTConfig, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, cfg.input_size, cfg.input_size))
    t = rng.uniform(size=batch)
    t[0], t[-1] = 0.0, 1.0
    y = np.arange(batch) % (cfg.num_classes + 1)
    y[-1] = cfg.num_classes  # the null label is a valid input
    return jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32)


# -------------------------------------------------------------------------------- shapes


def _abstract_forward(name: str, input_size: int, in_channels: int, z_dims=(768,)):
    """Shapes of (v, hidden, projections) for a batch of 2, with no real compute."""
    cfg = SiTConfig.from_name(name, input_size=input_size, in_channels=in_channels)
    model = eqx.filter_eval_shape(REPAModel, cfg, z_dims, key=jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, in_channels, input_size, input_size), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)

    def forward(model, x, t, y):
        v, hidden = jax.vmap(model.sit)(x, t, y)
        return v, hidden, jax.vmap(model)(x, t, y)[1]

    return cfg, model, eqx.filter_eval_shape(forward, model, x, t, y)


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("size", list(SIZES))
def test_shapes_every_size(size, patch):
    depth, hidden, heads, encoder_depth = SIZES[size]
    cfg, model, (v, h, zs) = _abstract_forward(f"SiT-{size}/{patch}", 32, 4, z_dims=(768, 384))
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (
        depth,
        hidden,
        heads,
        patch,
    )
    assert cfg.encoder_depth == encoder_depth
    tokens = (32 // patch) ** 2
    assert v.shape == (2, 4, 32, 32) and v.dtype == jnp.float32
    assert h.shape == (2, tokens, hidden)
    assert [z.shape for z in zs] == [(2, tokens, 768), (2, tokens, 384)]
    # The reference leaves SiT-S's final layer at width 768; ours follows the model width.
    assert model.sit.final_linear.weight.shape == (patch * patch * 4, hidden)
    assert model.sit.blocks.qkv.weight.shape == (depth, 3 * hidden, hidden)


@pytest.mark.parametrize(
    "name, channels, size",
    [("SiT-B/8", 3, 256), ("SiT-S/4", 1, 28), ("SiT-XL/2", 3, 64), ("SiT-L/4", 1, 32)],
)
def test_shapes_pixel_inputs(name, channels, size):
    cfg, _, (v, h, zs) = _abstract_forward(name, size, channels)
    tokens = (size // cfg.patch_size) ** 2
    assert v.shape == (2, channels, size, size)
    assert h.shape == (2, tokens, cfg.hidden_size)
    assert zs[0].shape == (2, tokens, 768)


def test_one_channel_model_runs():
    cfg = _tiny(in_channels=1, input_size=12, patch_size=4)  # a 3x3 token grid
    model = _random(cfg)
    x, t, y = _inputs(cfg, 3)
    v, (z,) = _forward(model, x, t, y)
    assert v.shape == (3, 1, 12, 12) and z.shape == (3, 9, 16)
    assert np.all(np.isfinite(v))
    # Unbatched call and the sampler's entry point agree with the batched one.
    one = eqx.filter_jit(lambda m, x, t, y: (m(x, t, y)[0], m.velocity(x, t, y)))
    for single in one(model, x[1], t[1], y[1]):
        np.testing.assert_allclose(single, v[1], atol=1e-5)


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError):
        SiTConfig.from_name("SiT-M/2")
    with pytest.raises(ValueError):
        SiTConfig.from_name("SiT-B/3")
    with pytest.raises(ValueError):
        _tiny(input_size=10, patch_size=4)
    with pytest.raises(ValueError):
        _tiny(encoder_depth=3)
    with pytest.raises(ValueError):
        _tiny(encoder_depth=0)
    sit = eqx.filter_eval_shape(SiT, _tiny(), key=jax.random.key(0))
    with pytest.raises(ValueError):
        sit(jnp.zeros((3, 8, 8)), jnp.asarray(0.5), jnp.asarray(1))


def test_parameter_count_sit_xl2():
    cfg = SiTConfig.from_name("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    n = _num_elements(eqx.filter_eval_shape(SiT, cfg, key=jax.random.key(0)))
    h, depth, p, c = 1152, 28, 2, 4
    block = (3 * h * h + 3 * h) + (h * h + h) + 2 * (4 * h * h) + 5 * h + (6 * h * h + 6 * h)
    closed_form = (
        (c * p * p * h + h)  # patch embedding
        + (256 * h + h)
        + (h * h + h)  # timestep MLP
        + 1001 * h  # label table with the null row
        + depth * block
        + (2 * h * h + 2 * h)
        + (h * p * p * c + p * p * c)  # final layer
    )
    assert n == closed_form == 674_816_272
    # The DiT / SiT / REPA papers quote 675M for XL/2, rounded to 3 significant figures
    # (+-0.5M). Their count (the reference's `parameters()`) also holds the frozen 256x1152
    # position table (0.29M) and DiT's learned-sigma half of the output layer (0.02M), which
    # SiT does not have: adding those back must land within the rounding of 675M.
    assert abs(n + 256 * h + (h * p * p * c + p * p * c) - 675e6) < 0.5e6
    assert abs(n - 675e6) / 675e6 < 1e-3
    with_projector = eqx.filter_eval_shape(REPAModel, cfg, (768,), key=jax.random.key(0))
    projector = (h * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 768 + 768)
    assert _num_elements(with_projector) == n + projector


# ----------------------------------------------------------------- position embedding


def _mae_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D table, one entry at a time: token n = row * grid + col. Quarter q of the
    features holds [sin(col w), cos(col w), sin(row w), cos(row w)][q], w_d = 10000^(-4d/dim)
    (MAE calls the column half `emb_h`: meshgrid(w, h) puts the column index first)."""
    quarter = dim // 4
    table = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            for d in range(quarter):
                w = 10000.0 ** (-d / quarter)
                feats = (np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w))
                for q, value in enumerate(feats):
                    table[row * grid + col, q * quarter + d] = value
    return table


@pytest.mark.parametrize("dim, grid", [(16, 4), (64, 5), (384, 16)])
def test_sincos_matches_mae_formula(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    assert ours.shape == (grid * grid, dim)
    np.testing.assert_allclose(ours, _mae_sincos(dim, grid), atol=1e-6)


def test_sincos_halves_columns_then_rows():
    dim, grid = 16, 4
    table = sincos_pos_embed_2d(dim, grid)
    origin = np.concatenate([np.zeros(dim // 4), np.ones(dim // 4)])  # position 0: sin 0, cos 0
    # Token 1 is (row 0, col 1): the row half is the origin's, the column half is not.
    np.testing.assert_allclose(table[1, dim // 2 :], origin, atol=1e-7)
    assert not np.allclose(table[1, : dim // 2], origin)
    # Token `grid` is (row 1, col 0): the other way round.
    np.testing.assert_allclose(table[grid, : dim // 2], origin, atol=1e-7)
    assert not np.allclose(table[grid, dim // 2 :], origin)


def test_position_table_is_not_a_parameter():
    cfg = _tiny(input_size=10)  # 25 tokens: no other leaf has 25 rows
    model = eqx.filter_eval_shape(REPAModel, cfg, (16,), key=jax.random.key(0))
    target = (cfg.num_tokens, cfg.hidden_size)
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        assert leaf.shape[-2:] != target, jax.tree_util.keystr(path)
        assert "pos" not in jax.tree_util.keystr(path)


# ---------------------------------------------------------------------- initialisation


def _patch_tokens(sit: SiT, x: jax.Array) -> np.ndarray:
    """The patch embedding by torch's conv: (tokens, hidden), row-major token order."""
    p = sit.config.patch_size
    out = torch.nn.functional.conv2d(
        torch.from_numpy(np.array(x))[None],
        torch.from_numpy(np.array(sit.patch_weight)),
        torch.from_numpy(np.array(sit.patch_bias)),
        stride=p,
    )
    return out[0].flatten(1).T.numpy()


@pytest.fixture(scope="module")
def initialised() -> REPAModel:
    """The real initialisation, large enough for distribution checks (64K label entries)."""
    cfg = _tiny(hidden_size=64, num_classes=1000, depth=3, encoder_depth=2, patch_size=4)
    return _build(cfg, (48,), projector_dim=128)


def test_zero_init_outputs_zero_and_blocks_are_identities(initialised):
    model = initialised
    cfg = model.sit.config
    x, t, y = _inputs(cfg, 3)
    v, _ = _forward(model, x, t, y)
    assert np.all(np.asarray(v) == 0.0)
    # adaLN-Zero: every gate is 0, so the hidden state is the patch embedding + position table.
    _, hidden = eqx.filter_jit(lambda m, x, t, y: m(x, t, y))(model.sit, x[0], t[0], y[0])
    expected = _patch_tokens(model.sit, x[0]) + _mae_sincos(cfg.hidden_size, cfg.grid_size)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(hidden, expected, atol=1e-5)


def _check_xavier(weight, fan_in: int, fan_out: int):
    w = np.asarray(weight).reshape(-1)
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound
    # Uniform on [-b, b]: std b / sqrt(3); tolerance ~4 standard errors at 1024 samples.
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.06
    assert abs(w.mean()) < 0.1 * bound


def test_initialisation_follows_reference(initialised):
    model, sit = initialised, initialised.sit
    cfg = sit.config
    h, mlp = cfg.hidden_size, 4 * cfg.hidden_size
    zero = [sit.blocks.adaln, sit.final_adaln, sit.final_linear]
    for linear in zero:
        assert np.all(np.asarray(linear.weight) == 0) and np.all(np.asarray(linear.bias) == 0)
    assert sit.final_linear.weight.shape == (cfg.patch_size**2 * cfg.in_channels, h)

    # Label table: num_classes + 1 rows (the last is the null class), N(0, 0.02).
    table = np.asarray(sit.label_table)
    assert table.shape == (cfg.num_classes + 1, h)
    assert abs(table.std() - 0.02) < 1e-3 and abs(table.mean()) < 1e-3
    # Timestep MLP: N(0, 0.02) weights (the reference overrides xavier here), zero biases.
    for linear in (sit.t_fc1, sit.t_fc2):
        assert abs(float(linear.weight.std()) - 0.02) < 2e-3
        assert np.all(np.asarray(linear.bias) == 0)
    assert sit.t_fc1.weight.shape == (h, 256)

    # Xavier-uniform weights and zero biases everywhere else; the patch conv as a flat Linear.
    _check_xavier(sit.patch_weight, cfg.in_channels * cfg.patch_size**2, h)
    assert np.all(np.asarray(sit.patch_bias) == 0)
    blocks = sit.blocks
    for name, fan_in, fan_out in [
        ("qkv", h, 3 * h),
        ("proj", h, h),
        ("fc1", h, mlp),
        ("fc2", mlp, h),
    ]:
        linear = getattr(blocks, name)
        for i in range(cfg.depth):
            _check_xavier(linear.weight[i], fan_in, fan_out)
        assert np.all(np.asarray(linear.bias) == 0)
        assert not np.allclose(linear.weight[0], linear.weight[1])  # blocks get their own keys
    (projector,) = model.projectors
    for linear, fan_in, fan_out in [
        (projector.fc1, h, 128),
        (projector.fc2, 128, 128),
        (projector.fc3, 128, 48),
    ]:
        _check_xavier(linear.weight, fan_in, fan_out)
        assert np.all(np.asarray(linear.bias) == 0)


# ------------------------------------------------------------------------- label dropout


def test_label_dropout_rate():
    cfg = _tiny()
    sit = _random(cfg).sit
    t, label, n = jnp.asarray(0.3), jnp.asarray(3), 20_000

    @eqx.filter_jit
    def embed_many(sit, y, keys):
        return jax.vmap(lambda k: sit.embed(t, y, key=k))(keys)

    @eqx.filter_jit
    def embed(sit, y):
        return sit.embed(t, y)

    dropped = embed_many(sit, label, jax.random.split(jax.random.key(1), n))
    null = embed(sit, jnp.asarray(cfg.num_classes))
    kept = embed(sit, label)
    assert np.abs(null - kept).max() > 1e-3
    is_null = np.all(np.isclose(dropped, null, atol=1e-6), axis=-1)
    is_kept = np.all(np.isclose(dropped, kept, atol=1e-6), axis=-1)
    assert np.all(is_null ^ is_kept)
    # p = 0.1 over 20K independent draws: standard error 0.0021.
    assert abs(is_null.mean() - 0.1) < 0.01

    # Without a key labels are never dropped.
    labels = jnp.arange(cfg.num_classes)
    plain = eqx.filter_jit(jax.vmap(embed, in_axes=(None, 0)))(sit, labels)
    np.testing.assert_allclose(
        plain - plain[:1], sit.label_table[:-1] - sit.label_table[:1], atol=1e-6
    )

    # With dropout probability 0 a key changes nothing.
    no_drop = _random(_tiny(class_dropout_prob=0.0)).sit
    keyed = embed_many(no_drop, label, jax.random.split(jax.random.key(2), 500))
    np.testing.assert_allclose(
        keyed, np.broadcast_to(embed(no_drop, label), keyed.shape), atol=1e-6
    )


# ------------------------------------------------------------------------- encoder depth


def test_encoder_depth_taps_the_hidden_state_after_block_k():
    x, t, y = _inputs(_tiny(), 2, seed=3)
    x, t, y = x[0], jnp.asarray(0.4), y[0]

    @eqx.filter_jit
    def run_blocks_by_hand(blocks, tokens, c):
        outputs = []
        for i in range(3):  # block i + 1, 1-based
            block = jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, blocks)
            tokens = block(tokens, c)
            outputs.append(tokens)
        return outputs

    velocities = []
    for k in (1, 2, 3):
        cfg = _tiny(depth=3, encoder_depth=k)
        sit = _random(cfg).sit
        v, hidden, c = eqx.filter_jit(lambda m, x, t, y: (*m(x, t, y), m.embed(t, y)))(sit, x, t, y)
        velocities.append(v)
        tokens = jnp.asarray(_patch_tokens(sit, x) + sincos_pos_embed_2d(32, cfg.grid_size))
        by_hand = run_blocks_by_hand(sit.blocks, tokens, c)
        np.testing.assert_allclose(hidden, by_hand[k - 1], atol=1e-5)
        for other in set(range(3)) - {k - 1}:  # the blocks differ, so the tap is identified
            assert np.abs(hidden - by_hand[other]).max() > 1e-2
    # Where REPA taps does not change the velocity.
    assert np.abs(velocities[0]).max() > 0.1
    for v in velocities[1:]:
        np.testing.assert_allclose(v, velocities[0], atol=1e-5)


# ---------------------------------------------------------------------- PyTorch parity


class TorchAttention(nn.Module):
    """timm's Attention (qkv bias, no qk-norm): qkv laid out as (3, heads, head_dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TorchMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def _torch_modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TorchBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TorchAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = TorchMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate_a[:, None] * self.attn(_torch_modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(_torch_modulate(self.norm2(x), shift_m, scale_m))


class TorchFinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(_torch_modulate(self.norm_final(x), shift, scale))


class TorchPatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchTimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TorchLabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class TorchSiT(nn.Module):
    """The reference SiT's forward in eval mode (no label dropout), with REPA projectors."""

    def __init__(self, cfg: SiTConfig, z_dims, projector_dim: int):
        super().__init__()
        h, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        self.cfg = cfg
        self.x_embedder = TorchPatchEmbed(c, h, p)
        self.t_embedder = TorchTimestepEmbedder(h)
        self.y_embedder = TorchLabelEmbedder(cfg.num_classes, h)
        table = torch.from_numpy(_mae_sincos(h, cfg.grid_size)).float()
        self.register_buffer("pos_embed", table[None], persistent=False)
        self.blocks = nn.ModuleList(TorchBlock(h, cfg.num_heads) for _ in range(cfg.depth))
        self.projectors = nn.ModuleList(
            nn.Sequential(
                nn.Linear(h, projector_dim),
                nn.SiLU(),
                nn.Linear(projector_dim, projector_dim),
                nn.SiLU(),
                nn.Linear(projector_dim, z),
            )
            for z in z_dims
        )
        self.final_layer = TorchFinalLayer(h, p * p * c)

    def unpatchify(self, x):
        n, p, c, g = x.shape[0], self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid_size
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, c))
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.cfg.encoder_depth:
                zs = [projector(x) for projector in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


def _torch_state_dict(model: REPAModel) -> dict[str, torch.Tensor]:
    """Our leaves under the reference's state-dict names."""
    sit = model.sit
    ours = {
        "x_embedder.proj.weight": sit.patch_weight,
        "x_embedder.proj.bias": sit.patch_bias,
        "t_embedder.mlp.0.weight": sit.t_fc1.weight,
        "t_embedder.mlp.0.bias": sit.t_fc1.bias,
        "t_embedder.mlp.2.weight": sit.t_fc2.weight,
        "t_embedder.mlp.2.bias": sit.t_fc2.bias,
        "y_embedder.embedding_table.weight": sit.label_table,
        "final_layer.adaLN_modulation.1.weight": sit.final_adaln.weight,
        "final_layer.adaLN_modulation.1.bias": sit.final_adaln.bias,
        "final_layer.linear.weight": sit.final_linear.weight,
        "final_layer.linear.bias": sit.final_linear.bias,
    }
    block_names = {
        "qkv": "attn.qkv",
        "proj": "attn.proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
        "adaln": "adaLN_modulation.1",
    }
    for i in range(sit.config.depth):
        for name, theirs in block_names.items():
            linear = getattr(sit.blocks, name)
            ours[f"blocks.{i}.{theirs}.weight"] = linear.weight[i]
            ours[f"blocks.{i}.{theirs}.bias"] = linear.bias[i]
    for j, projector in enumerate(model.projectors):
        for name, index in (("fc1", 0), ("fc2", 2), ("fc3", 4)):
            linear = getattr(projector, name)
            ours[f"projectors.{j}.{index}.weight"] = linear.weight
            ours[f"projectors.{j}.{index}.bias"] = linear.bias
    # Every one of our parameters is mapped exactly once.
    assert _num_elements(list(ours.values())) == _num_elements(eqx.filter(model, eqx.is_array))
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in ours.items()}


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("encoder_depth", [1, 3])
def test_parity_with_torch(patch, encoder_depth):
    cfg = _tiny(
        input_size=16,
        patch_size=patch,
        in_channels=3,
        hidden_size=48,
        depth=3,
        num_heads=4,
        encoder_depth=encoder_depth,
    )
    z_dims = (24, 40)
    model = _random(cfg, z_dims, projector_dim=64)
    x, t, y = _inputs(cfg, 4)
    v, zs = _forward(model, x, t, y)

    reference = TorchSiT(cfg, z_dims, projector_dim=64)
    reference.load_state_dict(_torch_state_dict(model), strict=True)  # names and shapes
    reference.eval()
    with torch.no_grad():
        v_ref, zs_ref = reference(
            torch.from_numpy(np.array(x)),
            torch.from_numpy(np.array(t)),
            torch.from_numpy(np.array(y, np.int64)),
        )
    assert np.abs(v_ref.numpy()).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(v, v_ref.numpy(), rtol=0, atol=1e-4)
    assert len(zs) == len(zs_ref) == 2
    for z, z_ref, dim in zip(zs, zs_ref, z_dims, strict=True):
        assert z.shape == (4, cfg.num_tokens, dim)
        np.testing.assert_allclose(z, z_ref.numpy(), rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------- bf16


def test_bfloat16_runs_close_to_float32():
    cfg = _tiny(depth=3, encoder_depth=2)
    model = _random(cfg)
    x, t, y = _inputs(cfg, 4)
    v32, (z32,) = _forward(model, x, t, y)

    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, model)
    v16, (z16,) = _forward(low, x.astype(jnp.bfloat16), t, y)
    assert v16.dtype == z16.dtype == jnp.bfloat16
    for lo, hi in ((v16, v32), (z16, z32)):
        lo = np.asarray(lo, np.float32)
        assert np.all(np.isfinite(lo))
        # bf16 keeps 8 mantissa bits (~0.4% per rounding); allow a few percent of the range.
        assert np.abs(lo - hi).max() <= 0.05 * np.abs(hi).max()


# -------------------------------------------------------------------------------- remat


def _loss_and_vjp(model, x, t, y, remat):
    """A scalar of both outputs, its gradient, and the residuals the backward pass keeps."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        run = eqx.combine(p, static)
        v, (z,) = jax.vmap(lambda *a: run(*a, remat=remat))(x, t, y)
        return jnp.sum(v * jnp.cos(v)) + jnp.sum(jnp.tanh(z))

    value, vjp_fn = jax.vjp(loss, params)
    (grads,) = vjp_fn(jnp.ones_like(value))
    residual_bytes = sum(a.nbytes for a in jax.tree.leaves(vjp_fn) if eqx.is_array(a))
    return value, grads, residual_bytes


@pytest.mark.slow
def test_remat_keeps_less_and_changes_no_gradient():
    """train.remat changes what the backward pass keeps (fewer residual bytes: dots < none,
    full < dots), never the loss or its gradient (to fp32 rounding: XLA fuses differently)."""
    cfg = _tiny(depth=4, encoder_depth=2)
    model = _random(cfg)
    x, t, y = _inputs(cfg, 3)
    ref_value, ref_grads, kept_none = _loss_and_vjp(model, x, t, y, "none")
    kept = {}
    for remat in ("dots", "full"):
        value, grads, kept[remat] = _loss_and_vjp(model, x, t, y, remat)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * np.abs(g_ref).max())
    assert kept["full"] < kept["dots"] < kept_none


def test_unknown_remat_is_refused():
    cfg = _tiny()
    model = _random(cfg)
    x, t, y = _inputs(cfg, 1)
    with pytest.raises(ValueError, match="unknown remat 'some'.*'dots'"):
        model(x[0], t[0], y[0], remat="some")


def test_unstacked_blocks_run_the_same_network():
    """A SiT whose blocks are a tuple of single blocks (`unstack_blocks`, the sampler's
    unrolled loop) computes what the stacked scan computes: output, hidden states, logits."""
    from repa_eqx.model.sit import unstack_blocks

    config = SiTConfig(
        input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2,
        num_classes=5, encoder_depth=2,
    )  # fmt: skip
    sit = SiT(config, key=jax.random.key(0))
    leaves, tree = jax.tree.flatten(sit)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    sit = jax.tree.unflatten(
        tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )
    unrolled = eqx.tree_at(lambda s: s.blocks, sit, unstack_blocks(sit.blocks))
    assert len(unrolled.blocks) == 3
    x = jax.random.normal(jax.random.key(2), (3, 8, 8))
    t, y = jnp.asarray(0.3), jnp.asarray(4)
    forward = eqx.filter_jit(lambda s: s.forward(x, t, y, depths=(1, 2), attention=(2,)))
    a, b = forward(sit), forward(unrolled)
    assert float(jnp.abs(a.output).mean()) > 0.01
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)

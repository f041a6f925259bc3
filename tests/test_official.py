"""Official REPA checkpoints: the torch-free `.pt` reader against torch.save, refusal of
hostile pickles, export -> load round trips, and parity with an independent PyTorch SiT
written below from SPEC.md under the reference's state-dict names."""

import argparse
import dataclasses
import os
import pickle
import zipfile
from collections import OrderedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from repa_eqx import WeightsMismatch
from repa_eqx.core.errors import ConfigError
from repa_eqx.model.repa import REPAModel
from repa_eqx.model.sit import SiTConfig
from repa_eqx.pretrained._torch_pickle import UnsafeCheckpoint, read_pt
from repa_eqx.pretrained.official import (
    export_official,
    from_official_state_dict,
    load_official,
    official_config,
    official_state_dict,
)

pytestmark = pytest.mark.standard_promotion

# A tiny SiT-S/2-like model: 8x8x4 latents (resolution 64), 16 tokens.
TINY_ARGS = dict(
    model="SiT-S/2",
    depth=4,
    hidden_size=64,
    num_heads=4,
    resolution=64,
    num_classes=10,
    encoder_depth=2,
    projector_dim=32,
)


def _random_model(args: dict, seed: int) -> REPAModel:
    """Every leaf N(0, 0.1^2): zero-initialised layers cannot hide a misplaced tensor."""
    config, z_dims, projector_dim = official_config(args)
    skeleton = eqx.filter_eval_shape(
        REPAModel, config, z_dims, projector_dim, key=jax.random.key(0)
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape)), skeleton)


def _assert_same_leaves(a: REPAModel, b: REPAModel):
    assert a.sit.config == b.sit.config
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@eqx.filter_jit
def _forward(model: REPAModel, x, t, y):
    return jax.vmap(model)(x, t, y)


def _inputs(config: SiTConfig, batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, config.in_channels, config.input_size, config.input_size))
    t = rng.uniform(size=batch)
    y = rng.integers(0, config.num_classes, size=batch)
    y[-1] = config.num_classes  # the null label
    return x.astype(np.float32), t.astype(np.float32), y


# ---------------------------------------------------------------------------- reader


def test_reader_matches_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    shared = torch.arange(12, dtype=torch.float32)
    saved = {
        "fp32": torch.randn(3, 4, generator=g),
        "fp16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "int64": torch.arange(-3, 7),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": base.t(),
        "sliced": base[2:5, 3:9:2],  # storage offset and a stride of 2
        "nested": {"a": {"b": shared[4:8].view(2, 2)}, "list": [shared[:3], (1, "x")]},
        "args": argparse.Namespace(model="SiT-B/2", lr=1e-4, tag=b"raw", none=None),
        "steps": 7,
    }
    path = tmp_path / "tensors.pt"
    torch.save(saved, path)
    got = read_pt(path)

    def check(ours, theirs):
        if theirs.dtype == torch.bfloat16:
            assert ours.dtype == ml_dtypes.bfloat16
            ours, theirs = ours.astype(np.float32), theirs.float()
        assert ours.dtype == theirs.numpy().dtype
        np.testing.assert_array_equal(ours, theirs.numpy())  # shapes too

    for name in ("fp32", "fp16", "bf16", "int64", "bool", "scalar", "empty", "transposed"):
        check(got[name], saved[name])
    check(got["sliced"], saved["sliced"])
    check(got["nested"]["a"]["b"], saved["nested"]["a"]["b"])
    check(got["nested"]["list"][0], saved["nested"]["list"][0])
    assert got["nested"]["list"][1] == (1, "x")
    assert vars(got["args"]) == {"model": "SiT-B/2", "lr": 1e-4, "tag": b"raw", "none": None}
    assert got["steps"] == 7
    assert not got["fp32"].flags.writeable


def _torch_like_zip(path, pickled: bytes, storages: tuple[tuple[str, bytes], ...] = ()):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        for key, data in storages:
            z.writestr(f"archive/data/{key}", data)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_refuses_code_and_bad_tensors(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _torch_like_zip(evil, pickle.dumps({"model": _RunsCode(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpoint, match="system"):
        read_pt(evil)
    with pytest.raises(UnsafeCheckpoint):
        load_official(evil)
    assert not marker.exists()

    # A tensor record pointing past its storage would make as_strided read foreign memory.
    torch = pytest.importorskip("torch")

    class OutOfRange:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, ("STORAGE", 0, (100,), (1,), False, {})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj == "STORAGE" else None

    pickled = tmp_path / "oob.pkl"
    with open(pickled, "wb") as f:
        Pickler(f, protocol=2).dump({"w": OutOfRange()})
    oob = tmp_path / "oob.pt"
    _torch_like_zip(oob, pickled.read_bytes(), (("0", np.zeros(4, np.float32).tobytes()),))
    with pytest.raises(UnsafeCheckpoint, match="reaches element 99"):
        read_pt(oob)


# ------------------------------------------------------------------------ round trip


def test_export_then_load_is_identity(tmp_path):
    args = TINY_ARGS | {"projector_embed_dims": "24"}
    model, ema = _random_model(args, seed=1), _random_model(args, seed=2)
    written = export_official(model, tmp_path / "tiny.pt", args=args, ema=ema)
    assert written[0] == tmp_path / "tiny.safetensors"

    loaded, info = load_official(written[0])
    _assert_same_leaves(loaded, ema)  # the safetensors holds the sampling (EMA) weights
    assert info.weights == "ema" and info.args == args and info.pos_embed_max_diff == 0.0

    if len(written) == 2:  # torch is importable: the reference's {model, ema, args}
        assert written[1] == tmp_path / "tiny.pt"
        assert sorted(read_pt(written[1])) == ["args", "ema", "model"]
        _assert_same_leaves(load_official(written[1])[0], ema)
        from_model, info = load_official(written[1], use_ema=False)
        _assert_same_leaves(from_model, model)
        assert info.weights == "model"

    # The early layout (decoder_blocks after the projector tap) loads to the same model.
    legacy, k = {}, args["encoder_depth"]
    for name, value in official_state_dict(model).items():
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= k:
            name = ".".join(["decoder_blocks", str(int(parts[1]) - k), *parts[2:]])
        legacy[name] = value
    assert any(name.startswith("decoder_blocks.") for name in legacy)
    config, z_dims, projector_dim = official_config(args)
    _assert_same_leaves(from_official_state_dict(legacy, config, z_dims, projector_dim), model)


def test_export_refuses_args_that_do_not_describe_the_model(tmp_path):
    args = TINY_ARGS | {"projector_embed_dims": "24"}
    model = _random_model(args, seed=0)
    with pytest.raises(ValueError, match="encoder_depth: args give 3, the model has 2"):
        export_official(model, tmp_path / "x", args=args | {"encoder_depth": 3})
    with pytest.raises(ValueError, match=r"projector dims: args give \(32,\)"):
        export_official(model, tmp_path / "x", args=args | {"projector_embed_dims": "32"})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------- an independent PyTorch reference


def _torch_reference(args: dict, seed: int, reg: bool = False):
    """SiT + REPA projectors from SPEC.md, modules named as the reference names them, every
    parameter random (the zero-initialised adaLN and output layers too). With `reg`, REG's
    SiT (Martinser/REG models/sit.py): the teacher's CLS token through `cls_projectors2` and
    `wg_norm` as token 0 (a zero position row), its velocity from `final_layer.linear_cls`
    on token 0 after the shared final norm and modulation; forward(x, t, y, cls_token)
    returns (v, zs, cls velocity)."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional
    h, heads, depth, k = (
        args["hidden_size"],
        args["num_heads"],
        args["depth"],
        args["encoder_depth"],
    )
    p, channels, grid = 2, 4, args["resolution"] // 8 // 2
    z_dims = [{"s": 384, "b": 768}[e[-1]] for e in args["enc_type"].split(",")]
    width = args["projector_dim"]
    qk_norm = bool(args.get("qk_norm"))

    def sincos(dim: int, grid: int):
        """MAE table: the first half of the features encodes the column, the second the row;
        sin then cos in each, frequencies 10000^(-j / (dim / 4))."""
        omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

        def axis(pos):
            angles = pos.reshape(-1, 1).double() * omega
            return torch.cat([angles.sin(), angles.cos()], dim=1)

        return torch.cat([axis(cols), axis(rows)], dim=1).float()

    def mlp(*sizes):
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        return nn.Sequential(*layers[:-1])

    def namespace(**modules):
        holder = nn.Module()
        for name, module in modules.items():
            holder.add_module(name, module)
        return holder

    def layer_norm(x):
        return F.layer_norm(x, (h,), eps=1e-6)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = namespace(qkv=nn.Linear(h, 3 * h), proj=nn.Linear(h, h))
            if qk_norm:  # timm's Attention(qk_norm=True): torch's default LayerNorm per head
                self.attn.add_module("q_norm", nn.LayerNorm(h // heads))
                self.attn.add_module("k_norm", nn.LayerNorm(h // heads))
            self.mlp = namespace(fc1=nn.Linear(h, 4 * h), fc2=nn.Linear(4 * h, h))
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

        def forward(self, x, c):
            mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
            a = layer_norm(x) * (1 + scale_a) + shift_a
            n, tokens, _ = a.shape
            q, k_, v = self.attn.qkv(a).view(n, tokens, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
            if qk_norm:
                q, k_ = self.attn.q_norm(q), self.attn.k_norm(k_)
            # HASTE's Attention (its sit.py): the logits it distils, beside the fused attention.
            self.attn_logits = (q * (h // heads) ** -0.5) @ k_.transpose(-2, -1)
            a = F.scaled_dot_product_attention(q, k_, v).transpose(1, 2).reshape(n, tokens, h)
            x = x + gate_a * self.attn.proj(a)
            m = layer_norm(x) * (1 + scale_m) + shift_m
            m = self.mlp.fc2(F.gelu(self.mlp.fc1(m), approximate="tanh"))
            return x + gate_m * m

    class ReferenceSiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = namespace(proj=nn.Conv2d(channels, h, p, stride=p))
            self.t_embedder = namespace(mlp=mlp(256, h, h))
            table = nn.Embedding(args["num_classes"] + 1, h)  # + the null class
            self.y_embedder = namespace(embedding_table=table)
            table = sincos(h, grid)
            if reg:
                table = torch.cat([torch.zeros(1, h), table])
                self.cls_projectors2 = nn.Linear(z_dims[0], h)
                self.wg_norm = nn.LayerNorm(h, eps=1e-6)
            self.pos_embed = nn.Parameter(table[None], requires_grad=False)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.projectors = nn.ModuleList(mlp(h, width, width, z) for z in z_dims)
            self.final_layer = namespace(
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h)),
                linear=nn.Linear(h, p * p * channels),
            )
            if reg:
                self.final_layer.add_module("linear_cls", nn.Linear(h, z_dims[0]))

        def forward(self, x, t, y, cls_token=None):
            x = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
            if reg:
                cls = self.wg_norm(self.cls_projectors2(cls_token))[:, None]
                x = torch.cat([cls, x], dim=1)
            x = x + self.pos_embed
            freqs = torch.exp(-np.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
            angles = t[:, None] * freqs
            t_emb = self.t_embedder.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))
            c = t_emb + self.y_embedder.embedding_table(y)
            for i, block in enumerate(self.blocks):
                x = block(x, c)
                if i + 1 == k:
                    zs = [projector(x) for projector in self.projectors]
            shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
            x = layer_norm(x) * (1 + scale) + shift
            if reg:
                cls_out, x = self.final_layer.linear_cls(x[:, 0]), x[:, 1:]
            x = self.final_layer.linear(x)
            n = x.shape[0]
            x = x.view(n, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
            x = x.reshape(n, channels, grid * p, grid * p)
            return (x, zs, cls_out) if reg else (x, zs)

    model = ReferenceSiT()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = param[0].numel() if param.ndim > 1 else 100
            param.copy_(torch.randn(param.shape, generator=g) * fan_in**-0.5)
    return model.eval()


PARITY_ARGS = TINY_ARGS | {"enc_type": "dinov2-vit-s,dinov2-vit-b", "fused_attn": True}


def _reference_outputs(reference, x, t, y):
    import torch

    with torch.no_grad():
        v, zs = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
    return v.numpy(), [z.numpy() for z in zs]


def test_official_checkpoint_matches_the_reference(tmp_path):
    torch = pytest.importorskip("torch")
    ema, trained = _torch_reference(PARITY_ARGS, seed=0), _torch_reference(PARITY_ARGS, seed=1)
    ckpt = {
        # DDP-wrapped online model, plain EMA: as train.py saves them.
        "model": OrderedDict((f"module.{k}", v) for k, v in trained.state_dict().items()),
        "ema": ema.state_dict(),
        "opt": {},
        "args": argparse.Namespace(**PARITY_ARGS),
        "steps": 4000,
    }
    path = tmp_path / "0004000.pt"
    torch.save(ckpt, path)

    for reference, use_ema in ((ema, True), (trained, False)):
        model, info = load_official(path, use_ema=use_ema)
        assert info.weights == ("ema" if use_ema else "model") and info.steps == 4000
        assert info.pos_embed_max_diff < 1e-6  # the independent table is ours
        assert [p.fc3.weight.shape[0] for p in model.projectors] == [384, 768]
        x, t, y = _inputs(model.sit.config)
        v, zs = _forward(model, x, t, y)
        v_ref, zs_ref = _reference_outputs(reference, x, t, y)
        assert np.abs(v_ref).max() > 0.5  # not trivially small
        np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-4)
        assert len(zs) == len(zs_ref) == 2
        for z, z_ref in zip(zs, zs_ref, strict=True):
            assert z.shape == z_ref.shape
            np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-4)

    # Our export loads into the reference with strict names and shapes, and agrees with it.
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _ = load_official(path)
    exported = export_official(model, tmp_path / "ours", args=PARITY_ARGS)
    fresh = _torch_reference(PARITY_ARGS, seed=5)
    fresh.load_state_dict(safetensors_torch.load_file(exported[0]), strict=True)
    x, t, y = _inputs(model.sit.config, seed=1)
    v_ref, _ = _reference_outputs(fresh, x, t, y)
    np.testing.assert_allclose(_forward(model, x, t, y)[0], v_ref, rtol=0, atol=1e-4)


def test_qk_norm_checkpoint_matches_the_reference(tmp_path):
    """REPA's --qk-norm: timm's per-head LayerNorms of q and k (our `qk_norm` switch)."""
    torch = pytest.importorskip("torch")
    args = PARITY_ARGS | {"qk_norm": True}
    reference = _torch_reference(args, seed=5)
    path = tmp_path / "qk.pt"
    torch.save({"ema": reference.state_dict(), "args": argparse.Namespace(**args)}, path)
    model, _ = load_official(path)
    assert model.sit.config.qk_norm and model.sit.config.norm == "layernorm"
    x, t, y = _inputs(model.sit.config)
    v, _ = _forward(model, x, t, y)
    v_ref, _ = _reference_outputs(reference, x, t, y)
    assert np.abs(v_ref).max() > 0.5
    np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-4)


def test_sit_attention_logits_match_hastes_reference():
    """The attention logits `SiT.forward(attention=...)` returns for HASTE are the reference
    blocks' (q * head_dim^-0.5) @ k^T, and asking for them leaves every output unchanged."""
    torch = pytest.importorskip("torch")
    reference = _torch_reference(PARITY_ARGS, seed=3)
    config, z_dims, projector_dim = official_config(PARITY_ARGS)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = from_official_state_dict(state, config, z_dims, projector_dim)
    x, t, y = _inputs(config)
    with torch.no_grad():
        reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
    blocks = (2, 3)  # 1-based; the second is past encoder_depth 2

    @eqx.filter_jit
    def run(model, x, t, y):
        return jax.vmap(lambda a, b, c: model.forward(a, b, c, attention=blocks))(x, t, y)

    out = run(model, x, t, y)
    for block, logits in zip(blocks, out.attention, strict=True):
        ref = reference.blocks[block - 1].attn_logits.numpy()
        assert logits.shape == ref.shape == (3, 4, 16, 16) and np.abs(ref).max() > 1
        np.testing.assert_allclose(logits, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    v, zs = _forward(model, x, t, y)
    np.testing.assert_array_equal(out.output, v)
    for a, b in zip(out.projected, zs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bare_state_dict_needs_args_and_pos_embed_is_checked(tmp_path):
    torch = pytest.importorskip("torch")
    state = _torch_reference(PARITY_ARGS, seed=3).state_dict()
    path = tmp_path / "last.pt"
    torch.save(state, path)  # what the released checkpoint holds: no args
    with pytest.raises(ValueError, match="lack model, encoder_depth, projector_embed_dims"):
        load_official(path)
    overrides = {k: v for k, v in PARITY_ARGS.items() if k != "enc_type"}
    model, info = load_official(path, projector_embed_dims="384,768", **overrides)
    assert info.weights == "state_dict" and info.steps is None
    with pytest.raises(ConfigError, match="unknown args fields"):
        load_official(path, modle="SiT-S/2", **overrides)
    with pytest.raises(WeightsMismatch, match="missing: blocks.0.attn.q_norm.weight"):
        load_official(path, qk_norm=True, **PARITY_ARGS)

    # The EMA of the frozen table drifts by fp32 rounding (~1e-4): accepted and reported.
    args = argparse.Namespace(**PARITY_ARGS)
    drifted = state | {"pos_embed": state["pos_embed"] * (1 + 3e-4)}
    torch.save({"ema": drifted, "args": args}, path)
    _, info = load_official(path)
    assert 1e-4 < info.pos_embed_max_diff < 1e-3
    # Another table (here: rows and columns swapped) is not ours.
    grid = PARITY_ARGS["resolution"] // 16
    table = state["pos_embed"].view(grid, grid, -1).transpose(0, 1).reshape(1, grid * grid, -1)
    torch.save(
        {"ema": state | {"pos_embed": table}, "args": argparse.Namespace(**PARITY_ARGS)}, path
    )
    with pytest.raises(WeightsMismatch, match="pos_embed is not the fixed 2-D sin-cos table"):
        load_official(path)
    # A wrong resolution shows up only in the table's shape.
    torch.save({"ema": state, "args": args}, path)
    with pytest.raises(WeightsMismatch, match="wrong resolution"):
        load_official(path, resolution=128)


def test_mismatch_lists_every_problem_once(tmp_path):
    torch = pytest.importorskip("torch")
    state = _torch_reference(PARITY_ARGS, seed=4).state_dict()
    del state["blocks.3.mlp.fc2.bias"]
    state["blocks.1.attn.q_norm.weight"] = torch.ones(16)  # a qk-norm checkpoint's extra
    state["projectors.1.2.weight"] = torch.zeros(32, 31)
    path = tmp_path / "bad.pt"
    torch.save({"ema": state, "args": argparse.Namespace(**PARITY_ARGS)}, path)
    with pytest.raises(WeightsMismatch) as caught:
        load_official(path)
    message = str(caught.value)
    assert "missing: blocks.3.mlp.fc2.bias" in message
    assert "unexpected: blocks.1.attn.q_norm.weight" in message
    assert "wrong shape: projectors.1.2.weight (32, 31) (expected (32, 32))" in message


# ------------------------------------------------------------------------------ REG


REG_ARGS = TINY_ARGS | {"enc_type": "dinov2-vit-s", "fused_attn": True, "cls": 0.03}


def _reg_forward(model: REPAModel, x, t, y, cls):
    @eqx.filter_jit
    def run(model, x, t, y, cls):
        def one(x, t, y, cls):
            out = model.forward(x, t, y, cls=cls)
            return out.output, out.projected, out.cls

        return jax.vmap(one)(x, t, y, cls)

    return run(model, x, t, y, cls)


def test_reg_checkpoint_matches_regs_sit_and_exports_back(tmp_path):
    """A checkpoint as REG's train.py saves it ({model (DDP), ema, opt, args with its `cls`
    loss weight, steps}) loads torch-free as a SiT with a CLS token; velocity, projections of
    all 1 + 16 tokens and the CLS velocity match REG's SiT, and our export loads back into it
    strictly."""
    torch = pytest.importorskip("torch")
    ema, trained = (_torch_reference(REG_ARGS, seed=s, reg=True) for s in (0, 1))
    ckpt = {
        "model": OrderedDict((f"module.{k}", v) for k, v in trained.state_dict().items()),
        "ema": ema.state_dict(),
        "opt": {},
        "args": argparse.Namespace(**REG_ARGS),
        "steps": 4000,
    }
    path = tmp_path / "0004000.pt"
    torch.save(ckpt, path)
    rng = np.random.default_rng(0)
    for reference, use_ema in ((ema, True), (trained, False)):
        model, info = load_official(path, use_ema=use_ema)
        assert model.sit.config.cls_dim == 384 and info.args["cls_token_dim"] == 384
        assert info.pos_embed_max_diff < 1e-6  # the zero CLS row, then our table
        x, t, y = _inputs(model.sit.config)
        cls = rng.standard_normal((3, 384)).astype(np.float32)
        v, zs, cls_v = _reg_forward(model, x, t, y, cls)
        with torch.no_grad():
            v_ref, zs_ref, cls_ref = reference(*map(torch.from_numpy, (x, t, y, cls)))
        assert np.abs(v_ref.numpy()).max() > 0.5 and np.abs(cls_ref.numpy()).max() > 0.5
        np.testing.assert_allclose(v, v_ref.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(cls_v, cls_ref.numpy(), rtol=0, atol=1e-4)
        assert zs[0].shape == zs_ref[0].shape == (3, 17, 384)
        np.testing.assert_allclose(zs[0], zs_ref[0].numpy(), rtol=0, atol=1e-4)

    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _ = load_official(path)
    exported = export_official(model, tmp_path / "ours", args=REG_ARGS | {"cls_token_dim": 384})
    fresh = _torch_reference(REG_ARGS, seed=5, reg=True)
    fresh.load_state_dict(safetensors_torch.load_file(exported[0]), strict=True)
    x, t, y = _inputs(model.sit.config, seed=1)
    cls = rng.standard_normal((3, 384)).astype(np.float32)
    with torch.no_grad():
        v_ref, _, cls_ref = fresh(*map(torch.from_numpy, (x, t, y, cls)))
    v, _, cls_v = _reg_forward(model, x, t, y, cls)
    np.testing.assert_allclose(v, v_ref.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(cls_v, cls_ref.numpy(), rtol=0, atol=1e-4)
    # Without REG's tensors, the same args describe a plain SiT: the CLS weights are refused.
    with pytest.raises(ConfigError, match="cls_dim"):
        export_official(model, tmp_path / "bad", args=REG_ARGS)


def test_reg_training_loss_matches_regs_siloss():
    """`repa_objective` with REG's term is REG's loss.py SILoss (its noises injected: the
    same t, image noise and CLS noise our objective draws from its key) and train.py's sum
    loss_mean + proj_coeff * proj_loss + cls * cls_loss, on REG's SiT."""
    torch = pytest.importorskip("torch")
    from repa_eqx.alignment import REG
    from repa_eqx.diffusion.interpolants import sample_t
    from repa_eqx.pretrained.official import sit_from_state_dict
    from repa_eqx.training.objective import Terms, repa_objective

    reference = _torch_reference(REG_ARGS, seed=2, reg=True)
    config, z_dims, projector_dim = official_config(REG_ARGS | {"cls_token_dim": 384})
    config = dataclasses.replace(config, class_dropout_prob=0.0)  # train.py drops labels apart
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model, _ = sit_from_state_dict(state, config, z_dims, projector_dim)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    feats = rng.standard_normal((4, 17, 384)).astype(np.float32)  # the CLS row, then patches
    key = jax.random.key(11)
    terms = Terms(proj_coeff=0.5, reg=REG(0.03))
    loss, parts = repa_objective(
        model,
        jnp.asarray(x),
        jnp.asarray(y, jnp.int32),
        (jnp.asarray(feats),),
        key,
        path="linear",
        weighting="uniform",
        terms=terms,
    )
    # What the objective draws from its key, in its order.
    k_t, k_noise, _ = jax.random.split(key, 3)
    t = np.array(sample_t(k_t, (4,), "linear", "uniform"))
    noise = np.array(jax.random.normal(k_noise, x.shape))
    cls_noise = np.array(jax.random.normal(jax.random.fold_in(key, 3), (4, 384)))

    # REG's SILoss.__call__ (linear path, v prediction) with the noises given.
    images, zs = torch.from_numpy(x), [torch.from_numpy(feats)]
    cls_token, time_input = zs[0][:, 0], torch.from_numpy(t).view(4, 1, 1, 1)
    noises, noises_cls = torch.from_numpy(noise), torch.from_numpy(cls_noise)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - time_input, time_input, -1, 1
    model_input = alpha_t * images + sigma_t * noises
    cls_input = (
        alpha_t.squeeze(-1).squeeze(-1) * cls_token + sigma_t.squeeze(-1).squeeze(-1) * noises_cls
    )
    model_target = d_alpha_t * images + d_sigma_t * noises
    cls_target = d_alpha_t * cls_token + d_sigma_t * noises_cls
    with torch.no_grad():
        out, zs_tilde, cls_out = reference(
            model_input, time_input.flatten(), torch.from_numpy(y), cls_token=cls_input
        )
    denoise = ((out - model_target) ** 2).mean(dim=(1, 2, 3))
    denoise_cls = ((cls_out - cls_target) ** 2).mean(dim=1)
    proj = 0.0
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        for z_j, z_tilde_j in zip(z, z_tilde, strict=True):
            z_tilde_j = torch.nn.functional.normalize(z_tilde_j, dim=-1)
            z_j = torch.nn.functional.normalize(z_j, dim=-1)
            proj += (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    proj /= len(zs) * 4
    total = denoise.mean() + 0.5 * proj + 0.03 * denoise_cls.mean()
    assert float(denoise_cls.mean()) > 0.1
    np.testing.assert_allclose(parts["denoise_loss"], float(denoise.mean()), rtol=2e-6)
    np.testing.assert_allclose(parts["cls_loss"], float(denoise_cls.mean()), rtol=2e-6)
    np.testing.assert_allclose(parts["repa_loss"], float(proj), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(loss, float(total), rtol=2e-6)

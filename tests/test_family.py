"""REPA's successors as recipe values: iREPA's projector and target normalisation and the
dispersive loss against PyTorch transcriptions of their authors' code (random weights, CPU),
the alignment weight schedule (HASTE's stop) and exact resume across its stop step.

The references transcribed (read, not copied):
- iREPA, End2End-Diffusion/iREPA @ 99ad4ac: `ldm/models/sit.py` ProjectionLayer (conv type:
  tokens -> (B, D, H, W) -> Conv2d(k, stride 1, padding k // 2) -> tokens),
  `ldm/utils.py` spatial z-score ((x - alpha * mean) / (std + 1e-6) over tokens, torch's
  unbiased std), `ldm/projection_loss.py` cosine loss.
- Dispersive loss, raywang4/DispLoss @ c58de8d: `transport/transport.py` disp_loss (pdist
  squared / dim, the B x B matrix with its zero diagonal, log of the mean of exp(-D)).
- HASTE, NUS-HPC-AI-Lab/HASTE @ eb7b1f1: `train.py` aligns while global_step < the stop point.
"""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny_recipe

from repa_eqx.alignment import (
    IREPA,
    AttentionDistillation,
    ConvProjector,
    alignment_weight,
    dispersive_loss,
    get_method,
    spatial_zscore,
)
from repa_eqx.core.errors import ConfigError
from repa_eqx.model import REPAModel, SiTConfig
from repa_eqx.runs import find_model, sample_model
from repa_eqx.runs.export import export_run
from repa_eqx.sampling.samples import example_inputs, sample_jit
from repa_eqx.training import train
from repa_eqx.training.checkpoint import Checkpointer
from repa_eqx.training.recipe import RecipeError, parse_recipe, recipe_to_dict

pytestmark = pytest.mark.standard_promotion

# ------------------------------------------------------------------------------- iREPA


def _torch_irepa_projector(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """iREPA's conv ProjectionLayer.forward: (B, T, D) -> (B, T, z)."""
    b, t, d = x.shape
    side = int(t**0.5)
    grid = x.reshape(b, side, side, d).permute(0, 3, 1, 2)
    out = conv(grid)
    return out.permute(0, 2, 3, 1).reshape(b, t, -1)


def _torch_zscore(feat: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    mean = feat.mean(dim=1, keepdim=True)
    std = feat.std(dim=1, keepdim=True)
    return (feat - alpha * mean) / (std + eps)


def _torch_cosine_loss(zs: torch.Tensor, zs_tilde: torch.Tensor) -> torch.Tensor:
    zs = torch.nn.functional.normalize(zs, dim=-1)
    zs_tilde = torch.nn.functional.normalize(zs_tilde, dim=-1)
    return (-(zs * zs_tilde).sum(dim=-1)).mean()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_irepa_projector_matches_the_reference_conv(kernel_size):
    head = ConvProjector(24, 20, kernel_size, key=jax.random.key(kernel_size))
    conv = torch.nn.Conv2d(24, 20, kernel_size, stride=1, padding=kernel_size // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(np.asarray(head.conv.weight)))
        conv.bias.copy_(torch.tensor(np.asarray(head.conv.bias).reshape(-1)))
    x = np.random.default_rng(0).standard_normal((3, 36, 24)).astype(np.float32)  # 6x6 grid
    ours = np.asarray(jax.vmap(head)(jnp.asarray(x)))
    with torch.no_grad():
        ref = _torch_irepa_projector(conv, torch.from_numpy(x)).numpy()
    assert ours.shape == (3, 36, 20)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
    # The reference leaves PyTorch's default init: weight and bias uniform in +-1/sqrt(fan_in).
    bound = 1 / np.sqrt(24 * kernel_size**2)
    for leaf in (head.conv.weight, head.conv.bias):
        leaf = np.abs(np.asarray(leaf))
        assert leaf.max() <= bound and (kernel_size > 1 or leaf.max() > 0.8 * bound)
    with pytest.raises(ConfigError, match="square token grid"):
        head(jnp.zeros((12, 24)))


def test_irepa_target_normalisation_and_loss_match_the_reference():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((4, 16, 12)) * 3 + 1.5).astype(np.float32)
    projected = rng.standard_normal((4, 16, 12)).astype(np.float32)
    for alpha in (0.6, 0.0, 1.0):
        ours = np.asarray(spatial_zscore(jnp.asarray(feats), alpha))
        ref = _torch_zscore(torch.from_numpy(feats), alpha).numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
    method = get_method("irepa")
    assert (method.kernel_size, method.alpha) == (1, 0.6)  # the released trainer's defaults
    ours = method.loss((jnp.asarray(projected),), method.targets((jnp.asarray(feats),)))
    ref = _torch_cosine_loss(
        _torch_zscore(torch.from_numpy(feats), 0.6), torch.from_numpy(projected)
    )
    assert float(ours) == pytest.approx(float(ref), abs=1e-6)
    # alpha = 1: a full z-score, zero mean and unit (unbiased) std per image and channel.
    z = np.asarray(spatial_zscore(jnp.asarray(feats), 1.0))
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=1, ddof=1), 1, atol=1e-4)


def test_irepa_model_projects_the_hidden_state_through_the_conv():
    config = SiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
        encoder_depth=1, num_classes=10,
    )  # fmt: skip
    model = REPAModel(config, (24,), key=jax.random.key(0), alignment=IREPA(kernel_size=3))
    assert isinstance(model.projectors[0], ConvProjector)
    leaves, tree = jax.tree.flatten(model)
    keys = iter(jax.random.split(jax.random.key(2), len(leaves)))
    model = jax.tree.unflatten(  # off adaLN-Zero's identity blocks
        tree,
        [x + 0.1 * jax.random.normal(next(keys), x.shape) if eqx.is_inexact_array(x) else x
         for x in leaves],
    )  # fmt: skip
    x, t, y = jax.random.normal(jax.random.key(1), (4, 8, 8)), jnp.array(0.4), jnp.array(3)
    _, (z,) = model(x, t, y)
    (hidden,) = model.sit.forward(x, t, y).hidden
    np.testing.assert_array_equal(z, model.projectors[0](hidden))
    # Taps: the hidden states after any blocks, the output unchanged.
    v, _, (h1, h2), _, _ = model.forward(x, t, y, taps=(1, 2))
    np.testing.assert_array_equal(h1, hidden)
    np.testing.assert_array_equal(v, model(x, t, y)[0])
    assert h2.shape == hidden.shape and not np.array_equal(h1, h2)
    with pytest.raises(ConfigError, match="kernel_size must be one of"):
        IREPA(kernel_size=2)


# ------------------------------------------------------------------------ dispersive


def _torch_disp_loss(z: torch.Tensor) -> torch.Tensor:
    """DispLoss' InfoNCE-L2 disp_loss (its zeros on the CPU here instead of .cuda())."""
    z = z.reshape((z.shape[0], -1))
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.concat((diff, diff, torch.zeros(z.shape[0])))
    return torch.log(torch.exp(-diff).mean())


def test_dispersive_loss_and_gradient_match_the_reference():
    rng = np.random.default_rng(2)
    h = (rng.standard_normal((8, 16, 6)) * 0.7).astype(np.float32)
    ref_in = torch.from_numpy(h).requires_grad_(True)
    ref = _torch_disp_loss(ref_in)
    ref.backward()
    ours, grad = jax.value_and_grad(dispersive_loss)(jnp.asarray(h))
    assert float(ours) == pytest.approx(ref.item(), abs=2e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_in.grad.numpy(), atol=1e-7, rtol=1e-4)
    # Groups: the mean of the reference's loss on each group (its per-GPU batches).
    halves = [float(_torch_disp_loss(torch.from_numpy(h[i : i + 4]))) for i in (0, 4)]
    assert float(dispersive_loss(jnp.asarray(h), group=4)) == pytest.approx(
        np.mean(halves), abs=2e-6
    )
    # tau divides the normalised squared distance.
    assert float(dispersive_loss(jnp.asarray(h), tau=0.5)) == pytest.approx(
        float(dispersive_loss(jnp.asarray(h) * np.sqrt(2.0))), abs=2e-6
    )
    with pytest.raises(ConfigError, match="does not split in groups of 3"):
        dispersive_loss(jnp.asarray(h), group=3)


def test_dispersive_loss_closed_forms():
    same = jnp.ones((6, 4, 5))
    assert float(dispersive_loss(same)) == pytest.approx(0.0, abs=1e-7)  # log mean exp(0)
    apart = jnp.eye(6).reshape(6, 2, 3) * 1e3  # every pair far apart: only the diagonal counts
    assert float(dispersive_loss(apart)) == pytest.approx(-np.log(6), abs=1e-6)
    grad = jax.grad(dispersive_loss)(same)
    assert np.isfinite(np.asarray(grad)).all()  # no NaN from the zero distances


# --------------------------------------------------------------------- HASTE attention


def _torch_haste_attn_loss(zs_tilde, zs, pairs, tokens):
    """HASTE's loss.py attention term: SiT block i's first 12 heads against the teacher's
    block j, rows of `tokens` keys, cross-entropy averaged over the pairs."""
    attn_loss = 0.0
    for i, j in pairs:
        zsi = zs_tilde[i][:, :12, :, :].reshape(-1, tokens)
        zs_j = zs[j].reshape(-1, tokens).softmax(dim=-1)
        attn_loss += -(zs_j * torch.log(zsi.softmax(dim=-1))).sum(dim=-1).mean()
    return attn_loss / len(pairs)


def test_haste_attention_loss_and_gradient_match_the_reference():
    rng = np.random.default_rng(3)
    student = [(rng.standard_normal((2, 16, 9, 9)) * 2).astype(np.float32) for _ in range(8)]
    teacher = [(rng.standard_normal((2, 12, 9, 9)) * 3).astype(np.float32) for _ in range(12)]
    pairs = [(i, i + 4) for i in range(4, 8)]  # its default: blocks 5-8 <- 9-12 (1-based)
    ref_in = [torch.tensor(a, requires_grad=True) for a in student]
    ref = _torch_haste_attn_loss(ref_in, [torch.from_numpy(a) for a in teacher], pairs, 9)
    ref.backward()
    term = AttentionDistillation()  # the released defaults
    assert (term.sit_blocks, term.teacher_layers, term.heads, term.coeff) == (
        (5, 6, 7, 8), (9, 10, 11, 12), 12, 0.5,
    )  # fmt: skip

    def ours(picked):
        chosen = [jnp.asarray(teacher[n - 1]) for n in term.teacher_layers]
        return term.loss(picked, chosen)

    value, grads = jax.value_and_grad(ours)([jnp.asarray(student[b - 1]) for b in term.sit_blocks])
    assert float(value) == pytest.approx(ref.item(), rel=1e-6)
    for b, grad in zip(term.sit_blocks, grads, strict=True):
        np.testing.assert_allclose(grad, ref_in[b - 1].grad.numpy(), rtol=1e-4, atol=1e-9)
    assert not np.asarray(grads[0])[:, 12:].any()  # heads 13-16 get no gradient
    with pytest.raises(ConfigError, match="need 12 heads"):
        term.loss([jnp.zeros((1, 8, 4, 4))] * 4, [jnp.zeros((1, 12, 4, 4))] * 4)
    with pytest.raises(ConfigError, match="as many of each"):
        AttentionDistillation(sit_blocks=(1, 2), teacher_layers=(3,))


# -------------------------------------------------------------------------- schedule


def test_the_schedule_is_hastes_stop_and_linear_ramps():
    steps = jnp.arange(8)
    stop = np.asarray(jax.vmap(lambda s: alignment_weight(s, stop=5))(steps))
    # HASTE aligns while global_step (updates done) < stop: exactly 5 aligned updates.
    np.testing.assert_array_equal(stop, [1, 1, 1, 1, 1, 0, 0, 0])
    ramp = np.asarray(jax.vmap(lambda s: alignment_weight(s, ((2, 0.0), (6, 1.0)), stop=7))(steps))
    np.testing.assert_allclose(ramp, [0, 0, 0, 0.25, 0.5, 0.75, 1, 0])
    assert float(alignment_weight(jnp.array(10**6))) == 1.0
    with pytest.raises(ConfigError, match="increasing steps"):
        alignment_weight(jnp.array(0), ((5, 1.0), (5, 0.0)))


def test_recipe_values_for_the_family(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        loss={"alignment": "irepa", "irepa": {"kernel_size": 3}, "schedule": {"stop": 4},
              "dispersive": {"coeff": 0.5, "block": 1, "group": 4}},
    )  # fmt: skip
    assert recipe.loss.irepa.kernel_size == 3 and recipe.loss.dispersive.group == 4
    bad = {
        "irepa": {"kernel_size": 2},
        "schedule": {"steps": [0, 10], "weights": [1.0]},
        "dispersive": {"block": 3},
    }
    messages = ["'loss.irepa.kernel_size' must be one of", "one weight per step", "[0, 2]"]
    for (key, value), message in zip(bad.items(), messages, strict=True):
        with pytest.raises(RecipeError, match=message.replace("[", "\\[").replace("]", "\\]")):
            tiny_recipe(tmp_path, loss={key: value})
    with pytest.raises(RecipeError, match="'loss.dispersive.group': 3 does not divide"):
        tiny_recipe(tmp_path, loss={"dispersive": {"group": 3}})
    with pytest.raises(RecipeError, match="increasing steps"):
        tiny_recipe(tmp_path, loss={"schedule": {"steps": [5, 2], "weights": [1.0, 0.0]}})
    haste = {"sit_blocks": [1], "teacher_layers": [1], "heads": 2}
    with pytest.raises(RecipeError, match="'loss.haste' needs a target encoder"):
        tiny_recipe(tmp_path, loss={"haste": haste})
    encoder = {"id": "facebook/dinov2-small", "resolution": 112}
    for key, value, message in [
        ("heads", 3, "'loss.haste.heads': 3 heads, the SiT has 2"),
        ("sit_blocks", [1, 2], "give as many of each"),
        ("sit_blocks", [3], "not all in \\[1, 2\\]"),
    ]:
        with pytest.raises(RecipeError, match=message):
            parse_recipe(_table(tmp_path, encoder, haste | {key: value}))
    with pytest.raises(RecipeError, match="set data.precompute_features = false"):
        parse_recipe(_table(tmp_path, encoder, haste, precompute=True))


def _table(out, encoder, haste, precompute=False):
    table = recipe_to_dict(tiny_recipe(out))
    table["encoders"] = [encoder]
    table["loss"]["haste"] = haste
    table["data"]["precompute_features"] = precompute
    return table


# -------------------------------------------------------------------------- training


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slow
def test_irepa_haste_and_dispersive_train_and_resume_exactly_across_the_stop(tmp_path, tiny_dinov2):
    """iREPA with HASTE's attention distillation and stop after 3 updates, and the dispersive
    loss: the alignment weight (on both alignment terms) is 1 for updates 1-3 and 0 after; a
    run interrupted at step 2 and resumed across the stop ends bit-identical to an
    uninterrupted one; the trained SiT samples."""
    haste = {"coeff": 0.5, "sit_blocks": [1], "teacher_layers": [1], "heads": 2}
    loss = {
        "alignment": "irepa",
        "proj_coeff": 1.0,
        "irepa": {"kernel_size": 3},
        "schedule": {"stop": 3},
        "dispersive": {"coeff": 0.25, "group": 4},
        "haste": haste,
    }
    train_spec = {"steps": 6, "log_every": 1, "checkpoint_every": 6}
    straight = tiny_recipe(tmp_path / "straight", tiny_dinov2, loss=loss, train=train_spec)
    train(straight, progress=False)
    records = _records(tmp_path / "straight")
    assert [r["align_weight"] for r in records] == [1, 1, 1, 0, 0, 0]
    for r in records:
        assert all(np.isfinite(r[k]) for k in ("repa_loss", "attn_loss", "dispersive_loss"))
        expected = r["denoise_loss"] + r["align_weight"] * (r["repa_loss"] + 0.5 * r["attn_loss"])
        expected += 0.25 * r["dispersive_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)

    split = tiny_recipe(tmp_path / "split", tiny_dinov2, loss=loss, train=train_spec)
    train(split, progress=False, stop_after=2)
    train(split, progress=False, resume=True)
    a = Checkpointer(tmp_path / "straight/checkpoints", read_only=True).restore_flat(6)[0]
    b = Checkpointer(tmp_path / "split/checkpoints", read_only=True).restore_flat(6)[0]
    assert a.keys() == b.keys() and any("projectors" in k and "conv" in k for k in a)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), name)
    assert [r["align_weight"] for r in _records(tmp_path / "split")] == [1, 1, 1, 0, 0, 0]

    card = (export_run(tmp_path / "straight", tmp_path / "export") / "README.md").read_text()
    for said in (
        "iREPA (a 3x3 conv projector",
        "HASTE's attention distillation of SiT blocks [1]",
        "off from step 3",
        "dispersive loss (InfoNCE-L2, tau 1, coefficient 0.25)",
    ):
        assert said in card, said
    run = sample_model(
        find_model(tmp_path / "straight"), steps=2, num=4, batch=4, out=tmp_path / "s.npz"
    )
    assert run.samples.images.shape == (4, 32, 32, 1) or run.samples.images.shape[0] == 4


# -------------------------------------------------------------------------------- REG
# Martinser/REG @ 021ea2e: its SiT, loss and SDE sampler are checked against transcriptions in
# test_official.py (model, checkpoints, SILoss) and test_samplers.py (euler_maruyama_sampler).


def test_reg_recipe_combinations(tmp_path):
    encoder = {"id": "facebook/dinov2-small", "resolution": 112}
    table = recipe_to_dict(tiny_recipe(tmp_path))
    table["encoders"] = [encoder]
    # With REPA, the HASTE-style stop and the dispersive loss: allowed.
    table["loss"] |= {"reg": {}, "schedule": {"stop": 4}, "dispersive": {"coeff": 0.1}}
    assert parse_recipe(table).loss.reg.coeff == 0.03
    for change, message in [
        ({"alignment": "irepa"}, "works on the patch grid alone"),
        ({"haste": {"sit_blocks": [1], "teacher_layers": [1], "heads": 2}}, "loss.haste"),
        ({"reg": {"coeff": -1.0}}, "coeff must be >= 0"),
    ]:
        bad = recipe_to_dict(parse_recipe(table))
        bad["loss"] |= change
        with pytest.raises(RecipeError, match=f"'loss.reg' .*{message}"):
            parse_recipe(bad)
    with pytest.raises(RecipeError, match="'loss.reg' needs a target encoder"):
        tiny_recipe(tmp_path, loss={"reg": {}})


@pytest.mark.slow
def test_reg_trains_resumes_samples_and_exports(tmp_path, tiny_dinov2):
    """REG with REPA, HASTE's stop after 3 updates and the dispersive loss: each logged loss
    is the sum of its terms (the CLS term unscheduled, as REG's); resuming at step 2 ends
    bit-identical; the run samples (SDE, the CLS token guided apart) and its export is a SiT
    with the teacher's CLS width."""
    loss = {"reg": {"coeff": 0.03}, "schedule": {"stop": 3}, "dispersive": {"coeff": 0.25}}
    train_spec = {"steps": 5, "log_every": 1, "checkpoint_every": 5}
    straight = tiny_recipe(tmp_path / "straight", tiny_dinov2, loss=loss, train=train_spec)
    train(straight, progress=False)
    records = _records(tmp_path / "straight")
    assert [r["align_weight"] for r in records] == [1, 1, 1, 0, 0]
    for r in records:
        assert r["cls_loss"] > 0.1 and np.isfinite(r["repa_loss"])
        expected = r["denoise_loss"] + r["align_weight"] * 0.5 * r["repa_loss"]
        expected += 0.03 * r["cls_loss"] + 0.25 * r["dispersive_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)

    split = tiny_recipe(tmp_path / "split", tiny_dinov2, loss=loss, train=train_spec)
    train(split, progress=False, stop_after=2)
    train(split, progress=False, resume=True)
    a = Checkpointer(tmp_path / "straight/checkpoints", read_only=True).restore_flat(5)[0]
    b = Checkpointer(tmp_path / "split/checkpoints", read_only=True).restore_flat(5)[0]
    assert a.keys() == b.keys() and "ema/sit/cls_token/embed/weight" in a
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), name)

    model = find_model(tmp_path / "straight")
    assert model.sit.config.cls_dim == 32  # the tiny DINOv2's width
    kwargs = dict(mode="sde", steps=3, cfg=2.0, num=4, batch=4, interval=(0.0, 0.85))
    guided = sample_model(model, cls_cfg=1.5, out=tmp_path / "a", **kwargs)
    assert guided.spec.cls_cfg_scale == 1.5 and guided.samples.images.shape[0] == 4
    # The CLS token's own guidance scale reaches the sampler and, through the blocks, the
    # image (5 updates leave the zero-initialised layers too small to show it: every weight
    # of this copy is random).
    rng = np.random.default_rng(0)
    sit = jax.tree.map(
        lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype),
        eqx.filter(model.sit, eqx.is_inexact_array),
    )
    sit = eqx.combine(sit, model.sit)
    noise, keys = example_inputs(0, jnp.arange(4), (1, 32, 32))
    y = jnp.arange(4, dtype=jnp.int32)
    images = [
        sample_jit(sit, dataclasses.replace(guided.spec, cls_cfg_scale=c), noise, y, keys)
        for c in (1.5, 0.0)
    ]
    assert float(jnp.abs(images[0] - images[1]).max()) > 1e-3
    folder = export_run(tmp_path / "straight", tmp_path / "export")
    assert "REG: the teacher's CLS token" in (folder / "README.md").read_text()
    exported = find_model(None, from_hub=str(folder))
    assert exported.sit.config.cls_dim == 32
    again = sample_model(exported, cls_cfg=1.5, out=tmp_path / "c", **kwargs)
    np.testing.assert_array_equal(again.samples.images, guided.samples.images)

"""The REPA objective against hand-computed numbers and the reference's PyTorch formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from repa_eqx.alignment import repa_loss
from repa_eqx.diffusion.losses import denoising_loss, total_loss

pytestmark = pytest.mark.standard_promotion

# ---------------------------------------------------------------------------- denoising


def _two_samples():
    """Batch of 2, shape (C, H, W) = (1, 2, 2); errors: sample 0 one entry of 1, sample 1
    all entries 2. Per-sample squared-error means 1/4 and 4, so the loss is 17/8."""
    target = jnp.zeros((2, 1, 2, 2))
    pred = target.at[0, 0, 0, 0].set(1.0).at[1].set(2.0)
    return pred, target


def test_denoising_loss_hand_computed():
    pred, target = _two_samples()
    loss = denoising_loss(pred, target)
    assert loss.shape == ()
    # Wrong reductions give: sum over C,H,W then batch mean 8.5; total sum 17; |err| 1.125.
    assert float(loss) == pytest.approx(2.125, abs=1e-7)
    # The error is squared, so the sign of the error does not matter.
    assert float(denoising_loss(target, pred)) == pytest.approx(2.125, abs=1e-7)


def test_denoising_loss_is_a_mean_over_dims_and_batch():
    pred, target = _two_samples()
    base = float(denoising_loss(pred, target))
    # Tiling C, H or W (mean, not sum, over them) and repeating the batch leave it unchanged.
    tile = (1, 3, 2, 5)
    assert float(denoising_loss(jnp.tile(pred, tile), jnp.tile(target, tile))) == pytest.approx(
        base, abs=1e-6
    )
    batch = (4, 1, 1, 1)
    assert float(denoising_loss(jnp.tile(pred, batch), jnp.tile(target, batch))) == pytest.approx(
        base, abs=1e-6
    )


def test_denoising_loss_matches_reference_formula_on_random_data():
    kp, kt = jax.random.split(jax.random.key(0))
    pred = jax.random.normal(kp, (5, 4, 8, 8))
    target = jax.random.normal(kt, (5, 4, 8, 8))
    # Reference: mean_flat((out - target) ** 2), then .mean() in the training loop.
    expected = np.mean(np.mean(np.square(np.asarray(pred) - np.asarray(target)), axis=(1, 2, 3)))
    assert float(denoising_loss(pred, target)) == pytest.approx(expected, rel=1e-6)


def test_denoising_loss_low_precision_inputs_reduce_in_fp32():
    pred, target = _two_samples()
    for dtype in (jnp.bfloat16, jnp.float16):
        loss = denoising_loss(pred.astype(dtype), target.astype(dtype))
        assert loss.dtype == jnp.float32
        assert float(loss) == pytest.approx(2.125, abs=1e-7)
    # fp16 squares of 300 overflow (max 65504); the fp32 reduction does not.
    big = jnp.full((2, 1, 4, 4), 300.0, jnp.float16)
    assert float(denoising_loss(big, jnp.zeros_like(big))) == pytest.approx(90000.0, rel=1e-6)


# ---------------------------------------------------------------------------------- REPA


def _features(key, batch=3, tokens=5, dim=8, dtype=jnp.float32):
    return jax.random.normal(key, (batch, tokens, dim), dtype)


def test_repa_loss_identical_negated_orthogonal():
    z = _features(jax.random.key(1))
    assert float(repa_loss([z], [z])) == pytest.approx(-1.0, abs=1e-6)
    assert float(repa_loss([z], [-z])) == pytest.approx(1.0, abs=1e-6)
    # Orthogonal per token: disjoint supports on the feature axis.
    a = z.at[..., 4:].set(0.0)
    b = z.at[..., :4].set(0.0)
    assert float(repa_loss([a], [b])) == pytest.approx(0.0, abs=1e-7)


def test_repa_loss_means_over_patches():
    z = _features(jax.random.key(2), tokens=4)
    # Two tokens aligned (-1 each), two anti-aligned (+1 each): the mean is 0, a sum would be 0
    # too, so also check 3 aligned + 1 anti-aligned: mean -0.5 (a sum would give -2).
    half = z.at[:, 2:].multiply(-1.0)
    assert float(repa_loss([half], [z])) == pytest.approx(0.0, abs=1e-6)
    one = z.at[:, 3:].multiply(-1.0)
    assert float(repa_loss([one], [z])) == pytest.approx(-0.5, abs=1e-6)


def test_repa_loss_invariant_to_positive_rescaling():
    kp, kt, ks = jax.random.split(jax.random.key(3), 3)
    p, t = _features(kp), _features(kt)
    base = float(repa_loss([p], [t]))
    assert -1.0 < base < 1.0
    # One positive scale per token, different for each input, spanning orders of magnitude.
    scale = jnp.exp(4 * jax.random.normal(ks, p.shape[:-1] + (1,)))
    assert float(repa_loss([scale * p], [t])) == pytest.approx(base, abs=1e-6)
    assert float(repa_loss([p], [0.01 * t])) == pytest.approx(base, abs=1e-6)
    # A negative scale is not an invariance: it flips the sign.
    assert float(repa_loss([-3.0 * p], [t])) == pytest.approx(-base, abs=1e-6)


def test_repa_loss_averages_encoders():
    k1, k2 = jax.random.split(jax.random.key(4))
    z1 = _features(k1, dim=8)
    z2 = _features(k2, dim=6)  # encoders may have different widths
    orth_p, orth_t = z2.at[..., 3:].set(0.0), z2.at[..., :3].set(0.0)
    assert float(repa_loss([z1, orth_p], [z1, orth_t])) == pytest.approx(-0.5, abs=1e-6)


def _reference_repa_loss(projected, targets):
    """The reference's loop (loss.py): per encoder and per sample, mean over patches of the
    negative cosine similarity (F.normalize), summed, divided by encoders * batch."""
    zs = [torch.from_numpy(np.array(t)) for t in targets]
    zs_tilde = [torch.from_numpy(np.array(p)).requires_grad_(True) for p in projected]
    loss = 0.0
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        for z_j, z_tilde_j in zip(z, z_tilde, strict=True):
            z_j = torch.nn.functional.normalize(z_j, dim=-1)
            z_tilde_j = torch.nn.functional.normalize(z_tilde_j, dim=-1)
            loss = loss + torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
    loss = loss / (len(zs) * zs[0].shape[0])
    loss.backward()
    return loss.item(), [z.grad.numpy() for z in zs_tilde]


def test_repa_loss_matches_reference_value_and_gradient():
    k = jax.random.split(jax.random.key(5), 4)
    projected = [_features(k[0], dim=8), _features(k[1], dim=16)]
    targets = [_features(k[2], dim=8), _features(k[3], dim=16)]
    # A zero projected token: torch's F.normalize gives a finite gradient there; so must we.
    projected[0] = projected[0].at[1, 2].set(0.0)
    expected, expected_grads = _reference_repa_loss(projected, targets)
    loss, grads = jax.value_and_grad(repa_loss)(projected, targets)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    for g, eg in zip(grads, expected_grads, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, eg, rtol=1e-4, atol=1e-6 * np.abs(eg).max())


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_repa_loss_normalises_in_fp32(dtype):
    # Entries of 300: the fp16 sum of squares (8 * 90000) overflows to inf; fp32 does not.
    z = jnp.full((2, 3, 8), 300.0, dtype).at[:, :, ::2].set(-300.0)
    loss = repa_loss([z], [z])
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(-1.0, abs=1e-6)
    assert float(repa_loss([z], [-z])) == pytest.approx(1.0, abs=1e-6)


def test_repa_loss_gradient_is_finite_and_bounded_loss():
    kp, kt = jax.random.split(jax.random.key(6))
    p, t = _features(kp, dtype=jnp.bfloat16), _features(kt)
    loss, grad = jax.value_and_grad(lambda p: repa_loss([p], [t]))(p)
    assert -1.0 <= float(loss) <= 1.0
    assert grad.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    assert np.any(np.asarray(grad, np.float32) != 0)


def test_repa_loss_rejects_mismatched_encoders():
    z = _features(jax.random.key(7))
    with pytest.raises(ValueError):
        repa_loss([z, z], [z])
    with pytest.raises(ValueError):
        repa_loss([], [])


# --------------------------------------------------------------------------------- total


def test_total_loss():
    denoise, align = jnp.asarray(0.8), jnp.asarray(-0.6)
    assert float(total_loss(denoise, align, 0.5)) == pytest.approx(0.8 - 0.3, abs=1e-7)
    assert float(total_loss(denoise, align, 2.0)) == pytest.approx(0.8 - 1.2, abs=1e-7)
    # The baseline: lambda = 0 or no encoder is the denoising loss, even if align is NaN.
    assert float(total_loss(denoise, align, 0.0)) == pytest.approx(0.8, abs=1e-7)
    assert float(total_loss(denoise, None, 0.5)) == pytest.approx(0.8, abs=1e-7)
    assert float(total_loss(denoise, jnp.asarray(jnp.nan), 0.0)) == pytest.approx(0.8, abs=1e-7)

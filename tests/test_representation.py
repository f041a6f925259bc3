"""CKNNA against its definition written out with loops and its invariances; the linear probe on
separable and on random labels; SiT features against a manual forward."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import ortho_group

from repa_eqx.evaluation.representation import cknna, linear_probe, sit_features
from repa_eqx.model.sit import SiT, SiTConfig


def _structured(n: int, dim: int, seed: int) -> np.ndarray:
    """Points near an 8-dimensional subspace: a neighbourhood structure worth aligning."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 8)) @ rng.standard_normal((8, dim))
    return (z + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)


# ------------------------------------------------------------------------------- CKNNA


def _brute_force_cknna(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The definition with explicit loops, in float64."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)
    kern_a = np.array([[a[i] @ a[j] for j in range(n)] for i in range(n)])
    kern_b = np.array([[b[i] @ b[j] for j in range(n)] for i in range(n)])

    def neighbours(kern):
        mask = np.zeros((n, n))
        for i in range(n):
            others = sorted((j for j in range(n) if j != i), key=lambda j: -kern[i, j])
            for j in others[:k]:
                mask[i, j] = 1
        return mask

    def hsic(kk, ll):
        # Song et al. (2012), eq. 5: the diagonals do not enter.
        t1 = sum(kk[i, j] * ll[j, i] for i in range(n) for j in range(n) if i != j)
        sum_k = sum(kk[i, j] for i in range(n) for j in range(n) if i != j)
        sum_l = sum(ll[i, j] for i in range(n) for j in range(n) if i != j)
        t3 = sum(
            kk[i, j] * ll[j, q]
            for i in range(n)
            for j in range(n)
            for q in range(n)
            if i != j and j != q
        )
        return (t1 + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * t3 / (n - 2)) / (n * (n - 3))

    mask_a, mask_b = neighbours(kern_a), neighbours(kern_b)
    mutual = mask_a * mask_b
    ab = hsic(mutual * kern_a, mutual * kern_b)
    aa = hsic(mask_a * kern_a, mask_a * kern_a)
    bb = hsic(mask_b * kern_b, mask_b * kern_b)
    return ab / np.sqrt(aa * bb)


@pytest.mark.parametrize("k", [2, 5])
def test_cknna_matches_brute_force(k):
    rng = np.random.default_rng(0)
    a = _structured(30, 12, seed=1)
    b = a @ rng.standard_normal((12, 7)).astype(np.float32) + rng.standard_normal((30, 7)).astype(
        np.float32
    )
    expected = _brute_force_cknna(a.astype(np.float64), b.astype(np.float64), k)
    assert cknna(a, b, k=k) == pytest.approx(expected, abs=1e-5)


def test_cknna_of_itself_is_one():
    a = _structured(500, 64, seed=0)
    assert cknna(a, a) == pytest.approx(1, abs=1e-5)


def test_cknna_of_independent_features_is_zero():
    a = _structured(500, 64, seed=0)
    b = np.random.default_rng(1).standard_normal((500, 64)).astype(np.float32)
    assert abs(cknna(a, b)) < 0.05


@pytest.mark.parametrize("normalize", [True, False])
def test_cknna_invariant_to_rotation_and_scale(normalize):
    a = _structured(300, 32, seed=0)
    b = a + np.random.default_rng(1).standard_normal(a.shape).astype(np.float32)
    q = ortho_group.rvs(32, random_state=2).astype(np.float32)
    base = cknna(a, b, normalize=normalize)
    assert cknna(a, b @ q, normalize=normalize) == pytest.approx(base, abs=1e-4)
    assert cknna(7.5 * a, b, normalize=normalize) == pytest.approx(base, abs=1e-4)


def test_cknna_decreases_with_noise():
    a = _structured(500, 64, seed=0)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(a.shape).astype(np.float32)
    scores = [cknna(a, a + s * noise) for s in (0.1, 0.3, 1.0, 3.0, 10.0)]
    assert all(0 < s < 1 for s in scores)
    assert all(x > y for x, y in zip(scores, scores[1:], strict=False))
    assert scores[0] > 0.9 and scores[-1] < 0.1


@pytest.mark.unchecked
def test_cknna_rejects_bad_input():
    a = np.ones((10, 3), np.float32)
    with pytest.raises(ValueError):
        cknna(a, a[:9])
    with pytest.raises(ValueError):
        cknna(a, a, k=1)
    with pytest.raises(ValueError):
        cknna(a, a, k=10)


# -------------------------------------------------------------------------- linear probe


def _clusters(n: int, seed: int, separation: float = 4.0):
    rng = np.random.default_rng(seed)
    centres = separation * np.eye(4, 16)
    # A large shared offset and scale: the probe standardises them away.
    y = rng.integers(0, 4, n)
    x = 100 + 50 * (centres[y] + rng.standard_normal((n, 16)))
    return x.astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("batch_size", [None, 64])
@pytest.mark.standard_promotion
def test_linear_probe_separates_clusters(batch_size):
    train_x, train_y = _clusters(400, seed=0)
    test_x, test_y = _clusters(400, seed=1)
    accuracy = linear_probe(
        train_x, train_y, test_x, test_y, num_classes=4, steps=200, batch_size=batch_size
    )
    assert accuracy > 0.95


@pytest.mark.standard_promotion
def test_linear_probe_random_labels_is_chance():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.standard_normal((200, 16)), rng.standard_normal((2000, 16))
    train_y, test_y = rng.integers(0, 4, 200), rng.integers(0, 4, 2000)
    accuracy = linear_probe(train_x, train_y, test_x, test_y, num_classes=4, steps=200)
    assert abs(accuracy - 0.25) < 0.05


@pytest.mark.standard_promotion
def test_linear_probe_deterministic():
    # Shapes and settings as in the minibatch test above: no new compile.
    train_x, train_y = _clusters(400, seed=0, separation=0.5)
    test_x, test_y = _clusters(400, seed=1, separation=0.5)
    run = lambda seed: linear_probe(
        train_x, train_y, test_x, test_y, num_classes=4, steps=200, batch_size=64, seed=seed
    )
    assert run(3) == run(3)


# --------------------------------------------------------------------------- SiT features


@pytest.fixture(scope="module")
def sit() -> SiT:
    """Every floating leaf random: the zero-initialised gates would make all blocks identity."""
    config = SiTConfig(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=4,
        num_heads=4,
        num_classes=10,
        encoder_depth=2,
    )
    skeleton = eqx.filter_eval_shape(SiT, config, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), skeleton
    )


def _images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 4, 8, 8)).astype(np.float32)


@eqx.filter_jit
def _manual(sit, x_t, t):
    return jax.vmap(sit)(x_t, t, jnp.full(len(x_t), sit.null_label))[1]


@pytest.mark.standard_promotion
def test_sit_features_match_the_encoder_depth_tap(sit):
    """Against the model's own tap on x_t, example i's noise drawn from fold_in(key, i)."""
    x, t, key = _images(), np.linspace(0.1, 0.9, 6, dtype=np.float32), jax.random.key(3)
    noise = np.stack([jax.random.normal(jax.random.fold_in(key, i), x.shape[1:]) for i in range(6)])
    expected = _manual(sit, (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise, t)
    layer = sit.config.encoder_depth
    tokens = sit_features(sit, x, t, layer=layer, key=key, pool=False)
    pooled = sit_features(sit, x, t, layer=layer, key=key)
    np.testing.assert_allclose(tokens, expected, atol=1e-5)
    np.testing.assert_allclose(pooled, expected.mean(axis=1), atol=1e-5)


@pytest.mark.standard_promotion
def test_sit_features_last_layer(sit):
    """Layer = depth (nothing cut) equals the encoder_depth = depth tap of the model, and
    differs from the encoder_depth = 2 tap. (Each layer is a compile: the others are alike.)"""
    x, t, key, layer = _images(), np.zeros(6, np.float32), jax.random.key(0), 4
    config = dataclasses.replace(sit.config, encoder_depth=layer)
    tapped = jax.tree.unflatten(
        jax.tree.structure(eqx.filter_eval_shape(SiT, config, key=jax.random.key(0))),
        jax.tree.leaves(sit),
    )
    got = sit_features(sit, x, t, layer=layer, key=key, pool=False)
    np.testing.assert_allclose(got, _manual(tapped, x, t), atol=1e-5)  # t = 0: x_t = x
    assert not np.allclose(got, _manual(sit, x, t), atol=1e-3)


@pytest.mark.standard_promotion
def test_sit_features_respect_t_key_and_chunks(sit):
    x = _images()
    run = lambda t, seed, batch_size=256: sit_features(
        sit, x, t, layer=2, key=jax.random.key(seed), pool=False, batch_size=batch_size
    )
    clean = run(0.0, 0)
    np.testing.assert_allclose(run(0.0, 1), clean, atol=1e-6)  # t = 0: the key is unused
    noisy = run(0.5, 0)
    assert not np.allclose(noisy, clean, atol=1e-3)
    assert not np.allclose(noisy, run(0.5, 1), atol=1e-3)
    np.testing.assert_allclose(run(0.5, 0, batch_size=3), noisy, atol=1e-5)
    with pytest.raises(ValueError):
        sit_features(sit, x, 0.5, layer=sit.config.depth + 1, key=jax.random.key(0))

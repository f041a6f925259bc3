"""ADM's metrics against closed forms, ADM's own formulas written out, and brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from repa_eqx.evaluation.adm import (
    Statistics,
    compute_metrics,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    load_reference_batch,
    load_samples,
    manifold_radii,
    precision_recall,
    reference_batch,
    save_reference_batch,
    save_samples,
)
from repa_eqx.pretrained.inception import InceptionOutput, InceptionV3, inception_features

METHODS = ["sqrtm", "eigh"]


def _random_features(n: int, dim: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return (scale * rng.standard_normal((n, dim)) @ mixing + rng.standard_normal(dim)).astype(
        np.float32
    )


# ------------------------------------------------------------------------ Frechet distance


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rotated", [False, True])
def test_frechet_distance_closed_form(method, rotated):
    """Covariances sharing eigenvectors: FD = |mu1 - mu2|^2 + sum (a + b - 2 sqrt(ab))."""
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    q = ortho_group.rvs(dim, random_state=1) if rotated else np.eye(dim)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
    assert got == pytest.approx(expected, rel=1e-10)


def test_methods_agree_with_scipy_route():
    """Non-commuting covariances of random data: eigh and sqrtm agree, and both with the
    textbook formula written with scipy's sqrtm."""
    mu1, sigma1 = gaussian_statistics(_random_features(500, 64, seed=1))
    mu2, sigma2 = gaussian_statistics(_random_features(500, 64, seed=2, scale=1.5))
    textbook = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(sigma1 + sigma2)
        - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    )
    by_sqrtm = frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
    by_eigh = frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh")
    assert textbook > 1
    assert by_sqrtm == pytest.approx(textbook, rel=1e-10)
    assert by_eigh == pytest.approx(textbook, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_to_itself_is_zero(method):
    mu, sigma = gaussian_statistics(_random_features(300, 32, seed=3))
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9 * np.trace(sigma)


def test_singular_covariances():
    """Fewer samples than dimensions: rank-deficient covariances, both routes finite and
    close (sqrtm perhaps through ADM's eps fallback)."""
    mu1, sigma1 = gaussian_statistics(_random_features(6, 20, seed=4))
    mu2, sigma2 = gaussian_statistics(_random_features(6, 20, seed=5))
    assert np.linalg.matrix_rank(sigma1) < 20
    by_sqrtm = frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
    by_eigh = frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh")
    assert np.isfinite(by_sqrtm)
    assert by_sqrtm == pytest.approx(by_eigh, rel=1e-4)


@pytest.mark.unchecked
def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_gaussian_statistics_match_numpy():
    features = _random_features(50, 8, seed=6)
    mu, sigma = gaussian_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64).T))


# ----------------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_even_predictions_is_the_class_count():
    classes, split = 10, 100
    labels = np.arange(1000) % classes  # every chunk of 100 holds each class 10 times
    logits = 60.0 * np.eye(classes)[labels]
    assert inception_score(logits, split_size=split) == pytest.approx(classes, rel=1e-6)


def test_inception_score_matches_adm_formula():
    """ADM's loop over 5000-sample chunks, on softmax probabilities (in float64 here)."""
    logits = 3 * np.random.default_rng(7).standard_normal((12000, 50))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for lo in range(0, len(probs), 5000):  # 5000, 5000, 2000
        part = probs[lo : lo + 5000]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits) == pytest.approx(np.mean(scores), rel=1e-10)


# ---------------------------------------------------------------- precision and recall


def _brute_force_pr(ref: np.ndarray, sam: np.ndarray, k: int) -> tuple[float, float]:
    def dist(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(dist(ref, ref), axis=1)[:, k]
    sam_radii = np.sort(dist(sam, sam), axis=1)[:, k]
    d = dist(ref, sam)
    precision = (d <= ref_radii[:, None]).any(axis=0).mean()
    recall = (d <= sam_radii[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_of_a_set_with_itself():
    features = _random_features(200, 16, seed=8)
    assert precision_recall(features, features) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets():
    features = _random_features(100, 16, seed=9)
    assert precision_recall(features, features + 1000) == (0.0, 0.0)


@pytest.mark.parametrize("batch_size", [7, 1000])  # many uneven blocks, one block
def test_precision_recall_against_brute_force(batch_size):
    """Samples collapsed towards the centre: high precision, low recall."""
    ref = _random_features(150, 8, seed=10)
    sam = 0.3 * (_random_features(120, 8, seed=11) - ref.mean(0)) + ref.mean(0)
    expected = _brute_force_pr(ref, sam, k=3)
    got = precision_recall(ref, sam, k=3, batch_size=batch_size)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] > 0.9 and got[1] < 0.1


def test_manifold_radii_are_kth_neighbour_distances():
    features = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]], np.float32)
    # Squared distances to the 2nd nearest other point.
    np.testing.assert_array_equal(manifold_radii(features, k=2), [9, 4, 9, 36, 144])


# --------------------------------------------------------------------------- all at once


def _fake_features(n: int, seed: int) -> InceptionOutput:
    """Narrower than Inception's (the math does not care), and more samples than
    dimensions, so no covariance is singular."""
    rng = np.random.default_rng(seed)
    return InceptionOutput(
        pool=_random_features(n, 24, seed),
        spatial=_random_features(n, 20, seed + 100),
        logits=rng.standard_normal((n, 30)).astype(np.float32),
    )


def test_compute_metrics_puts_the_pieces_together():
    samples, reference = _fake_features(40, 1), _fake_features(50, 2)
    metrics = compute_metrics(samples, reference, method="eigh")
    sample_stats, ref_stats = Statistics.of(samples), Statistics.of(reference)
    assert metrics.fid == pytest.approx(
        frechet_distance(sample_stats.mu, sample_stats.sigma, ref_stats.mu, ref_stats.sigma),
        rel=1e-6,
    )
    assert metrics.sfid == pytest.approx(sample_stats.sfid(ref_stats), rel=1e-6)
    assert metrics.inception_score == pytest.approx(inception_score(samples.logits))
    assert (metrics.precision, metrics.recall) == precision_recall(reference.pool, samples.pool)
    # Stored reference statistics take the place of the reference features' own.
    stored = compute_metrics(samples, reference, sample_stats, method="eigh")
    assert abs(stored.fid) < 1e-9 and abs(stored.sfid) < 1e-9
    assert stored.precision == metrics.precision


def _random_inception(seed: int) -> InceptionV3:
    """He-normal weights, small biases: activations stay finite through the network."""
    rng = np.random.default_rng(seed)

    def leaf(shape) -> jax.Array:
        std = np.sqrt(2 / np.prod(shape[1:])) if len(shape) > 1 else 0.1
        return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

    return jax.tree.map(lambda a: leaf(a.shape), InceptionV3())


def test_reference_batch_files(tmp_path):
    images = np.random.default_rng(12).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    model = _random_inception(seed=13)
    stats, features = reference_batch(images, model, batch_size=2, progress=False)
    np.testing.assert_array_equal(
        features.pool, inception_features(model, images, batch_size=2, progress=False).pool
    )
    assert stats.mu.shape == (2048,) and stats.sigma_s.shape == (2023, 2023)
    path = tmp_path / "ref.npz"
    save_reference_batch(path, images, stats)
    with np.load(path) as data:
        assert sorted(data) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    loaded_images, loaded = load_reference_batch(path)
    np.testing.assert_array_equal(loaded_images, images)
    for name in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))


def test_sample_files(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    save_samples(tmp_path / "s.npz", images, labels=np.arange(4))
    np.testing.assert_array_equal(load_samples(tmp_path / "s.npz"), images)
    assert load_reference_batch(tmp_path / "s.npz")[1] is None  # images without statistics
    with pytest.raises(ValueError, match="uint8 NHWC"):
        save_samples(tmp_path / "bad.npz", images.astype(np.float32))
    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(ValueError, match="no arr_0"):
        load_samples(tmp_path / "other.npz")

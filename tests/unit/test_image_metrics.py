"""FID, Inception Score, improved precision/recall, saturation and ADM reference-batch readers.

Oracles: closed-form Fréchet distances of Gaussians (samples whitened to exact moments), the IS of
uniform and balanced one-hot predictions plus a per-row scipy KL loop, brute-force full distance
matrices with np.partition for precision/recall, and `colorsys` HSV for saturation.
"""

from __future__ import annotations

import colorsys

import jax
import numpy as np
import pytest
import scipy.stats

from gmflow_jax.eval import image_metrics as im
from gmflow_jax.eval import reference_batches as rb

# ------------------------------------------------------------------------------------------------
# FID


def samples_with_moments(rng, mu, sigma, n):
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly sigma."""
    d = mu.shape[0]
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(sigma).T + mu


def random_spd(rng, d):
    """A random well-conditioned SPD matrix."""
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def gaussian_w2_squared(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(cross))
    )


def test_fid_of_a_feature_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 3.0
    assert abs(im.fid_from_features(x, x)) < 1e-6


def test_fid_between_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    x1 = samples_with_moments(rng, mu1, s1, 300)
    x2 = samples_with_moments(rng, mu2, s2, 250)
    want = gaussian_w2_squared(mu1, s1, mu2, s2)
    assert want > 1.0
    assert im.fid_from_features(x1, x2) == pytest.approx(want, rel=1e-9)
    assert im.fid_from_reference(x1, mu2, s2) == pytest.approx(want, rel=1e-9)

    # Diagonal covariances: sum of squared differences of the standard deviations.
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    diag = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert im.fid_from_reference(
        samples_with_moments(rng, mu1, np.diag(a), 200), mu2, np.diag(b)
    ) == pytest.approx(diag, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = im.inception_score(np.zeros((100, 1008)), num_splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_balanced_one_hot_predictions_is_the_class_count():
    classes, splits = 8, 4
    labels = np.tile(np.arange(classes), splits * 3)  # every split holds every class 3 times
    logits = 60.0 * np.eye(classes)[labels]
    mean, std = im.inception_score(logits, num_splits=splits)
    assert mean == pytest.approx(classes, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_per_row_kl_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(120, 30)) * 3.0
    splits = 6
    scores = []
    for i in range(splits):
        part = logits[i * 20 : (i + 1) * 20]
        p = np.exp(part) / np.exp(part).sum(axis=1, keepdims=True)
        marginal = p.mean(axis=0)
        kl = [scipy.stats.entropy(row, marginal) for row in p]
        scores.append(np.exp(np.mean(kl)))
    mean, std = im.inception_score(logits, num_splits=splits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    assert 1.5 < mean < 30
    with pytest.raises(ValueError, match="num_splits"):
        im.inception_score(logits, num_splits=121)


# ------------------------------------------------------------------------------------------------
# Precision / recall


def brute_force_precision_recall(real, fake, k):
    """Full squared-distance matrices (direct differences) and np.partition radii."""

    def sq(a, b):
        return np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)

    r_real = np.partition(sq(real, real), k, axis=1)[:, k]
    r_fake = np.partition(sq(fake, fake), k, axis=1)[:, k]
    d = sq(fake, real)
    precision = np.mean(np.any(d <= r_real[None, :], axis=1))
    recall = np.mean(np.any(d <= r_fake[:, None], axis=0))
    return precision, recall, r_real


def two_gaussian_sets(seed=3):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(257, 6))
    fake = 0.8 + 0.8 * rng.normal(size=(190, 6))
    return real, fake


def test_precision_recall_matches_brute_force_exactly_in_float64():
    real, fake = two_gaussian_sets()
    want_p, want_r, want_radii = brute_force_precision_recall(real, fake, 3)
    assert 0.05 < want_p < 0.95 and 0.05 < want_r < 0.95  # a non-trivial case
    with jax.enable_x64(True):
        radii = im.knn_sq_radii(real, 3, row_chunk=64, col_chunk=48)
        np.testing.assert_allclose(radii, want_radii, rtol=1e-12)
        for rows, cols in [(64, 48), (1000, 1000)]:
            got = im.precision_recall(real, fake, 3, row_chunk=rows, col_chunk=cols)
            assert got == (want_p, want_r), (rows, cols)


def test_precision_recall_in_float32_agrees_with_brute_force():
    real, fake = two_gaussian_sets(4)
    want_p, want_r, _ = brute_force_precision_recall(real, fake, 3)
    p, r = im.precision_recall(
        real.astype(np.float32), fake.astype(np.float32), 3, row_chunk=64, col_chunk=48
    )
    # A float32 distance may land on the other side of a radius for a borderline point.
    assert abs(p - want_p) <= 2 / len(fake)
    assert abs(r - want_r) <= 2 / len(real)


def test_precision_recall_of_identical_and_of_separated_sets():
    # Same sizes, dimension and chunks as the float32 test above: the compiled blocks are reused.
    rng = np.random.default_rng(5)
    sphere = rng.normal(size=(257, 6))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    assert im.precision_recall(sphere, sphere, row_chunk=64, col_chunk=48) == (1.0, 1.0)
    # Another unit sphere 10 away: every cross distance (>= 8) exceeds every k-NN radius (<= 2).
    far = rng.normal(size=(190, 6))
    far = far / np.linalg.norm(far, axis=1, keepdims=True) + 10.0 * np.eye(6)[0]
    assert im.precision_recall(sphere, far, row_chunk=64, col_chunk=48) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        im.knn_sq_radii(sphere[:3], 3)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        im.precision_recall(sphere, sphere[:, :2])


def test_a_point_exactly_on_a_ball_boundary_counts_as_inside():
    real = np.arange(10.0)[:, None]  # k = 3 radius of point 0: distance 3 (to 1, 2, 3)
    # -3 is exactly 3 from point 0; 12.5 is 3.5 from point 9 (radius 3); the rest are far away.
    fake = np.array([[-3.0], [12.5], [30.0], [31.0], [32.0]])
    assert im.precision_recall(real, fake, 3)[0] == 0.2
    assert im.precision_recall(real, fake, 3) == brute_force_precision_recall(real, fake, 3)[:2]


# ------------------------------------------------------------------------------------------------
# Saturation


def test_saturation_of_grey_is_zero_and_of_pure_red_is_one():
    grey = np.broadcast_to(np.arange(0, 256, 8, dtype=np.uint8)[:, None, None, None], (32, 4, 4, 3))
    assert im.mean_saturation(np.ascontiguousarray(grey)) == 0.0
    red = np.zeros((3, 5, 5, 3), np.uint8)
    red[..., 0] = 255
    assert im.mean_saturation(red) == 1.0
    dark_red = red // 3
    assert im.mean_saturation(dark_red) == pytest.approx(1.0, abs=1e-7)
    half = np.concatenate([red[:1], np.full((1, 5, 5, 3), 90, np.uint8)])
    assert im.mean_saturation(half) == pytest.approx(0.5, abs=1e-7)
    assert im.relative_saturation(half, 0.318) == pytest.approx(0.5 - 0.318, abs=1e-7)


def test_saturation_matches_colorsys_hsv():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    images[0, 0, 0] = 0  # a black pixel: saturation 0 by definition
    want = np.mean(
        [colorsys.rgb_to_hsv(*(px / 255.0))[1] for px in images.reshape(-1, 3).astype(np.float64)]
    )
    assert im.mean_saturation(images, batch_size=2) == pytest.approx(want, abs=1e-6)
    batches = [images[:1], images[1:4], images[4:]]
    assert im.mean_saturation(iter(batches)) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="uint8 RGB"):
        im.mean_saturation(images.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# All metrics at once


def test_inception_metrics_combines_the_metrics():
    real, fake = (x.astype(np.float32) for x in two_gaussian_sets(7))
    logits = np.random.default_rng(7).normal(size=(fake.shape[0], 20))
    chunks = {"row_chunk": 64, "col_chunk": 48}
    got = im.inception_metrics(fake, logits, real, num_splits=5, **chunks)
    assert got["fid"] == pytest.approx(im.fid_from_features(fake, real), rel=1e-12)
    assert got["inception_score"] == im.inception_score(logits, 5)[0]
    assert (got["precision"], got["recall"]) == im.precision_recall(real, fake, **chunks)
    mu, sigma = np.zeros(6), np.eye(6)
    with_ref = im.inception_metrics(
        fake, logits, real, real_mu=mu, real_sigma=sigma, num_splits=5, **chunks
    )
    assert with_ref["fid"] == pytest.approx(im.fid_from_reference(fake, mu, sigma), rel=1e-12)
    with pytest.raises(ValueError, match="real_mu"):
        im.inception_metrics(fake, logits, real, real_mu=mu)


# ------------------------------------------------------------------------------------------------
# Reference batches


@pytest.mark.parametrize("compressed", [False, True])
def test_reference_batch_round_trip_and_streaming(tmp_path, compressed):
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    stats = {
        "mu": rng.normal(size=4),
        "sigma": np.eye(4),
        "mu_s": rng.normal(size=3),
        "sigma_s": 2 * np.eye(3),
    }
    path = str(tmp_path / "ref.npz")
    (np.savez_compressed if compressed else np.savez)(path, images, **stats)

    ref = rb.read_reference_batch(path)
    np.testing.assert_array_equal(ref.images, images)
    assert ref.image_shape == (5, 8, 6, 3) and ref.num_images == 5
    assert ref.has_statistics and ref.has_spatial_statistics
    for key, value in stats.items():
        np.testing.assert_array_equal(getattr(ref, key), value)
    lazy = rb.read_reference_batch(path, load_images=False)
    assert lazy.images is None and lazy.image_shape == (5, 8, 6, 3)

    batches = list(rb.iter_reference_images(path, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_reference_batch_with_statistics_only_and_bad_files(tmp_path):
    stats_only = str(tmp_path / "stats.npz")
    np.savez(stats_only, mu=np.zeros(3), sigma=np.eye(3))
    ref = rb.read_reference_batch(stats_only)
    assert ref.images is None and ref.num_images == 0 and not ref.has_spatial_statistics
    with pytest.raises(ValueError, match="no 'arr_0'"):
        next(rb.iter_reference_images(stats_only))

    bad = {
        "float_images.npz": ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "uint8 images"),
        "half_stats.npz": ({"mu": np.zeros(3)}, "only one of mu"),
        "bad_sigma.npz": ({"mu": np.zeros(3), "sigma": np.eye(2)}, r"sigma \[D, D\]"),
        "empty.npz": ({"other": np.zeros(1)}, "needs 'arr_0'"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            rb.read_reference_batch(str(tmp_path / name))

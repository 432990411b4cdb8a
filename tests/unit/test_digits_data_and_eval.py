"""Tests of the digits data (`gmflow_jax.data.digits`), the Fréchet distance
(`gmflow_jax.eval.frechet`) and the digits evaluator (`gmflow_jax.eval.digits`).

Oracles: scikit-learn's raw pixels, counting, a hand-built bilinear matrix, closed-form Fréchet
distances (diagonal covariances; eigendecomposition of S1^{1/2} S2 S1^{1/2}), hand-computed
saturation numbers. The classifier is trained once per module (shared fixture).
"""

from __future__ import annotations

import time
import types

import jax
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from sklearn.datasets import load_digits as sklearn_load_digits

import gmflow_jax.eval.digits as eval_digits
import gmflow_jax.eval.frechet as frechet_module
from gmflow_jax.data.digits import (
    HELD_OUT_PER_CLASS,
    NUM_CLASSES,
    NUM_IMAGES,
    held_out_indices,
    load_digits,
    load_digits_images,
    upsample_digits,
)
from gmflow_jax.eval.digits import (
    FEATURE_DIM,
    DigitsClassifier,
    DigitsEvaluator,
    classifier_cache_path,
    load_or_train_classifier,
    saturation_statistics,
)
from gmflow_jax.eval.frechet import feature_statistics, frechet_distance

_SQRTM = scipy.linalg.sqrtm  # the real one, for wrappers that monkeypatch it

# ------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def data8():
    """The 8x8 split."""
    return load_digits(8)


def test_images_are_the_sklearn_digits_scaled_linearly_to_minus_one_one():
    images, labels = load_digits_images(8)
    raw = sklearn_load_digits()
    assert images.shape == (NUM_IMAGES, 8, 8, 1) == (1797, 8, 8, 1)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], (raw.images / 8.0 - 1.0).astype(np.float32))
    np.testing.assert_array_equal(labels, raw.target)
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(np.unique(labels)) == list(range(10))


def test_split_is_disjoint_stratified_and_covers_every_image(data8):
    held = held_out_indices()
    images, labels = load_digits_images(8)
    assert held.shape == (300,) and len(np.unique(held)) == 300
    np.testing.assert_array_equal(held, held_out_indices())  # deterministic
    train = np.setdiff1d(np.arange(NUM_IMAGES), held)
    assert len(train) == 1497 and data8.num_train == 1497
    np.testing.assert_array_equal(
        np.bincount(labels[held], minlength=10), [HELD_OUT_PER_CLASS] * 10
    )
    np.testing.assert_array_equal(data8.held_out_images, images[held])
    np.testing.assert_array_equal(data8.held_out_labels, labels[held])
    np.testing.assert_array_equal(data8.train_images, images[train])
    np.testing.assert_array_equal(data8.train_labels, labels[train])
    # Regression pin: the split decides which digits the cached classifiers and FDs refer to.
    np.testing.assert_array_equal(held[:8], [4, 5, 6, 9, 14, 18, 19, 34])


def test_batches_visit_every_training_image_once_per_epoch(data8):
    key = jax.random.key(3)
    batch_size = 100  # 1497 is not a multiple: batch 14 straddles epochs 0 and 1
    stream = np.concatenate([data8.batch_indices(key, s, batch_size) for s in range(30)])
    n = data8.num_train
    for epoch in range(2):
        np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # a fresh permutation each epoch
    images, labels = next(data8.batches(key, batch_size, start_step=14))
    np.testing.assert_array_equal(images, data8.train_images[stream[1400:1500]])
    np.testing.assert_array_equal(labels, data8.train_labels[stream[1400:1500]])


@pytest.mark.parametrize("batch_size", [64, 2000])  # 2000 > 1497: every batch spans two epochs
def test_batches_are_deterministic_and_resume_from_a_step(data8, batch_size):
    key = jax.random.key(7)
    full = data8.batches(key, batch_size)
    uninterrupted = [next(full) for _ in range(30)]
    again = data8.batches(key, batch_size)
    for images, labels in uninterrupted[:5]:
        got_images, got_labels = next(again)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    resumed = data8.batches(key, batch_size, start_step=21)
    for images, labels in uninterrupted[21:]:
        got_images, got_labels = next(resumed)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    for step in (0, 23):
        np.testing.assert_array_equal(data8.batch(key, step, batch_size)[1], uninterrupted[step][1])
    other = next(data8.batches(jax.random.key(8), batch_size))[1]
    assert not np.array_equal(other, uninterrupted[0][1])
    assert uninterrupted[0][0].shape == (batch_size, 8, 8, 1)


def test_upsampling_to_16_is_the_separable_bilinear_map():
    images, _ = load_digits_images(8)
    up = upsample_digits(images[:50], 16)
    assert up.shape == (50, 16, 16, 1) and up.dtype == np.float32
    # Half-pixel centres: output o samples input coordinate o/2 - 1/4; outside samples are dropped
    # and the remaining weight renormalised, so the first and last rows copy the edge pixels.
    a = np.zeros((16, 8))
    for i in range(8):
        a[2 * i, i] += 0.75
        a[2 * i, max(i - 1, 0)] += 0.25
        a[2 * i + 1, i] += 0.75
        a[2 * i + 1, min(i + 1, 7)] += 0.25
    expected = np.einsum("oi,nij,pj->nop", a, images[:50, :, :, 0].astype(np.float64), a)
    np.testing.assert_allclose(up[..., 0], expected, atol=1e-6)
    data16 = load_digits(16)
    assert data16.train_images.shape == (1497, 16, 16, 1)
    assert data16.held_out_images.shape == (300, 16, 16, 1)
    assert data16.train_images.min() >= -1.0 and data16.train_images.max() <= 1.0


def test_data_arguments_are_validated(data8):
    with pytest.raises(ValueError, match="image_size"):
        load_digits(12)
    with pytest.raises(ValueError, match="batch_size"):
        next(data8.batches(jax.random.key(0), 0))
    with pytest.raises(ValueError, match="start_step"):
        next(data8.batches(jax.random.key(0), 8, start_step=-1))
    with pytest.raises(ValueError, match="key"):
        data8.batch(np.zeros(3, np.uint32), 0, 8)


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix through eigh."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_by_eigh(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))."""
    r = _psd_sqrt(s1)
    w = np.linalg.eigvalsh(r @ s2 @ r)
    return float(
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sum(np.sqrt(np.clip(w, 0, None)))
    )


def _random_covariance(rng, d: int) -> np.ndarray:
    """A well-conditioned random SPD matrix [d, d]."""
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32) @ rng.normal(size=(5, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (5, 5)
    x64 = x.astype(np.float64)
    centred = x64 - x64.sum(0) / 200
    np.testing.assert_allclose(mu, x64.sum(0) / 200, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 199, rtol=1e-10)


def test_frechet_distance_of_a_feature_set_to_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_matches_the_eigendecomposition_oracle_and_is_symmetric():
    rng = np.random.default_rng(3)
    for d in (2, 10, 40):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
        expected = _frechet_by_eigh(mu1, s1, mu2, s2)
        got12 = frechet_distance(mu1, s1, mu2, s2)
        got21 = frechet_distance(mu2, s2, mu1, s1)
        np.testing.assert_allclose(got12, expected, rtol=1e-8)
        np.testing.assert_allclose(got21, got12, rtol=1e-9)
        assert got12 > 0


def test_frechet_distance_of_rank_deficient_statistics_is_finite_and_close_to_the_oracle():
    rng = np.random.default_rng(4)
    x1 = rng.normal(size=(20, 30))  # N < D: singular covariances
    x2 = rng.normal(size=(20, 30)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(x1), feature_statistics(x2)
    got = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, _frechet_by_eigh(mu1, s1, mu2, s2), rtol=1e-4)


def test_non_finite_square_root_is_retried_with_eps_on_the_diagonals(monkeypatch):
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = _random_covariance(rng, 4), _random_covariance(rng, 4)
    calls = []

    def first_call_fails(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else _SQRTM(a)

    monkeypatch.setattr(frechet_module.scipy.linalg, "sqrtm", first_call_fails)
    eps = 0.3  # large, so that the shifted result differs visibly from the plain one
    got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(4)) @ (s2 + eps * np.eye(4)))
    root = _psd_sqrt(s1 + eps * np.eye(4))
    shifted_trace = np.sum(np.sqrt(np.linalg.eigvalsh(root @ (s2 + eps * np.eye(4)) @ root)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * shifted_trace
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    assert abs(got - _frechet_by_eigh(mu1, s1, mu2, s2)) > 1e-3


def test_small_imaginary_parts_are_dropped_and_large_ones_raise(monkeypatch):
    rng = np.random.default_rng(6)
    mu = rng.normal(size=3)
    s1, s2 = _random_covariance(rng, 3), _random_covariance(rng, 3)
    expected = frechet_distance(mu, s1, mu, s2)
    for imag, ok in ((1e-5, True), (1e-1, False)):
        monkeypatch.setattr(
            frechet_module.scipy.linalg,
            "sqrtm",
            lambda a, imag=imag: _SQRTM(a) + 1j * imag * np.eye(3),
        )
        if ok:
            np.testing.assert_allclose(frechet_distance(mu, s1, mu, s2), expected, rtol=1e-12)
        else:
            with pytest.raises(ValueError, match="imaginary"):
                frechet_distance(mu, s1, mu, s2)


def test_frechet_arguments_are_validated():
    with pytest.raises(ValueError, match="features"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------------
# evaluator


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data8):
    """Train the 8x8 classifier once into a fresh work directory and build the evaluator."""
    workdir = tmp_path_factory.mktemp("digits_classifier")
    start = time.perf_counter()
    model, accuracy = load_or_train_classifier(str(workdir), 8)
    train_seconds = time.perf_counter() - start
    evaluator = DigitsEvaluator(model, data8)
    print(
        f"\ndigits classifier: held-out accuracy {accuracy:.4f}, trained in {train_seconds:.1f} s"
    )
    return types.SimpleNamespace(
        workdir=str(workdir), model=model, accuracy=accuracy, evaluator=evaluator
    )


def _box_blur(images: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge padding."""
    s = images.shape[1]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[:, i : i + s, j : j + s] for i in range(3) for j in range(3)) / 9.0


def test_classifier_reaches_95_percent_held_out_accuracy(trained, data8):
    assert trained.accuracy >= 0.95
    logits = trained.evaluator.logits(data8.held_out_images)
    assert logits.shape == (300, NUM_CLASSES)
    assert np.mean(logits.argmax(-1) == data8.held_out_labels) == trained.accuracy
    assert trained.evaluator.real_accuracy == trained.accuracy


def test_real_digits_score_high_and_corrupted_digits_score_far(trained, data8):
    ev = trained.evaluator
    x, y = data8.held_out_images, data8.held_out_labels
    real = ev.evaluate(x, y)
    assert real["accuracy"] >= 0.95 and abs(real["fd"]) < 1e-6
    train = ev.evaluate(data8.train_images, data8.train_labels)
    assert train["accuracy"] >= 0.99  # the classifier's own training images
    assert 0 < train["fd"] == pytest.approx(ev.real_fd_train, rel=1e-9)
    rng = np.random.default_rng(0)
    noise = ev.evaluate(rng.uniform(-1, 1, size=x.shape).astype(np.float32), y)
    blurred = ev.evaluate(_box_blur(x), y)
    assert noise["fd"] > 20 * train["fd"] and blurred["fd"] > 10 * train["fd"]
    assert noise["accuracy"] < 0.3
    shuffled = ev.evaluate(x, rng.permutation(y))
    assert 0.02 < shuffled["accuracy"] < 0.2  # ~0.1 +- 0.017 for 300 images
    assert shuffled["fd"] == real["fd"]  # the FD ignores labels
    # precision / recall against the training digits' manifold: real held-out digits lie on it
    # (the held-out reference itself), noise does not; recall of noise collapses too
    assert real["precision"] == ev.real_precision and real["recall"] == ev.real_recall
    assert real["precision"] > 0.9 and train["precision"] == 1.0  # k-NN balls contain their centres
    assert noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert blurred["precision"] < real["precision"] - 0.2


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 3 images: singular covariance
def test_saturation_statistics_match_hand_computed_values(trained):
    ev = trained.evaluator
    a = np.full((8, 8, 1), 0.99, np.float32)  # saturated everywhere, |x| = 0.99
    b = np.full((8, 8, 1), 0.5, np.float32)
    b[:4] = -1.5  # 32 pixels below -1: clipped to -1 (saturated), out of range
    c = np.full((8, 8, 1), 0.98, np.float32)  # exactly at the threshold: not saturated
    c[0, 0] = -0.985  # one saturated pixel
    metrics = ev.evaluate(np.stack([a, b, c]), np.array([0, 1, 2]))
    assert np.isnan(metrics["precision"]) and np.isnan(metrics["recall"])  # N = 3 <= k
    np.testing.assert_allclose(
        metrics["mean_abs"], (64 * 0.99 + 32 * 1.0 + 32 * 0.5 + 63 * 0.98 + 0.985) / 192, rtol=1e-6
    )
    np.testing.assert_allclose(
        metrics["mean_abs_unclipped"],
        (64 * 0.99 + 32 * 1.5 + 32 * 0.5 + 63 * 0.98 + 0.985) / 192,
        rtol=1e-6,
    )
    assert metrics["frac_saturated"] == pytest.approx((64 + 32 + 1) / 192, abs=1e-12)
    assert metrics["frac_out_of_range"] == pytest.approx(32 / 192, abs=1e-12)
    assert metrics["nonfinite_rate"] == 0.0
    # The held-out digits: |raw/8 - 1| > 0.98 exactly for raw pixels 0 and 16.
    raw = sklearn_load_digits().images[held_out_indices()]
    assert metrics["real_mean_abs"] == pytest.approx(np.mean(np.abs(raw / 8 - 1)), rel=1e-6)
    assert metrics["real_frac_saturated"] == pytest.approx(np.mean((raw == 0) | (raw == 16)))
    assert saturation_statistics(np.array([-1.0, 0.0, 0.5, 0.99])) == pytest.approx(
        {"mean_abs": 2.49 / 4, "frac_saturated": 0.5}
    )


def test_non_finite_images_are_counted_and_do_not_break_the_metrics(trained, data8):
    x = data8.held_out_images[:40].copy()
    x[3, 2, 2, 0] = np.nan
    x[7, 0, 0, 0] = np.inf
    metrics = trained.evaluator.evaluate(x, data8.held_out_labels[:40])
    assert metrics["nonfinite_rate"] == pytest.approx(2 / 40)
    assert all(np.isfinite(v) for v in metrics.values())


def test_features_are_batched_consistently(trained, data8):
    ev = trained.evaluator
    x = np.concatenate([data8.train_images[:400], data8.held_out_images])  # 700 > one chunk
    features = ev.features(x)
    assert features.shape == (700, FEATURE_DIM) and features.dtype == np.float32
    np.testing.assert_allclose(ev.features(x[650:653]), features[650:653], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ev.features(x[:1]), features[:1], rtol=1e-5, atol=1e-6)


def test_cache_reloads_identical_weights_without_training(trained, data8, monkeypatch):
    path = classifier_cache_path(trained.workdir, 8)
    assert path.startswith(trained.workdir)

    def no_training(*args, **kwargs):
        raise AssertionError("train_classifier was called although the cache file exists")

    monkeypatch.setattr(eval_digits, "train_classifier", no_training)
    model, accuracy = load_or_train_classifier(trained.workdir, 8)
    assert accuracy == trained.accuracy
    original = jax.tree_util.tree_leaves(nnx.state(trained.model))
    reloaded = jax.tree_util.tree_leaves(nnx.state(model))
    assert len(original) == len(reloaded) == 8
    for a, b in zip(original, reloaded, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evaluator = DigitsEvaluator.from_workdir(trained.workdir, 8)
    np.testing.assert_array_equal(
        evaluator.features(data8.held_out_images[:5]),
        trained.evaluator.features(data8.held_out_images[:5]),
    )


def test_cache_file_of_another_configuration_is_not_used(trained, monkeypatch, tmp_path):
    path = classifier_cache_path(trained.workdir, 8)
    with np.load(path) as stored:
        arrays = dict(stored)
    arrays["config"] = np.array(str(arrays["config"]).replace('"seed": 0', '"seed": 5'))
    target = classifier_cache_path(str(tmp_path), 8)
    np.savez(target, **arrays)

    class Retrained(Exception):
        pass

    def sentinel(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(eval_digits, "train_classifier", sentinel)
    with pytest.raises(Retrained):
        load_or_train_classifier(str(tmp_path), 8)
    assert classifier_cache_path(trained.workdir, 8, seed=1) != path


def test_classifier_builds_for_16x16_images():
    abstract = nnx.eval_shape(lambda: DigitsClassifier(16, rngs=nnx.Rngs(0)))
    x = np.zeros((3, 16, 16, 1), np.float32)
    features, logits = nnx.eval_shape(lambda m: (m.features(x), m(x)), abstract)
    assert features.shape == (3, FEATURE_DIM) and logits.shape == (3, NUM_CLASSES)


def test_evaluator_arguments_are_validated(trained, data8):
    ev = trained.evaluator
    with pytest.raises(ValueError, match="images"):
        ev.evaluate(np.zeros((4, 16, 16, 1), np.float32), np.zeros(4, int))
    with pytest.raises(ValueError, match="labels"):
        ev.evaluate(data8.held_out_images[:4], np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="labels"):
        ev.evaluate(data8.held_out_images[:4], np.zeros(3, int))
    with pytest.raises(ValueError, match="image_size"):
        DigitsEvaluator(trained.model, load_digits(16))
    with pytest.raises(ValueError, match="image_size"):
        DigitsClassifier(12, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="image_size"):
        load_or_train_classifier(trained.workdir, 32)

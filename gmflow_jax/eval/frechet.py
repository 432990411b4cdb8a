"""Fréchet distance between Gaussian fits of two feature sets (the FID formula, `docs/math.md` §7).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

is the squared 2-Wasserstein distance between N(mu1, S1) and N(mu2, S2). With Inception pool
features it is the FID of §7; the digits evaluator uses a small classifier's features. Everything
runs in float64 numpy on the host.

The square root of the (non-symmetric) product S1 S2 is `scipy.linalg.sqrtm`, as in the usual FID
code: when the result is not finite (near-singular product), both covariances get `eps` added to
their diagonals and the root is taken again; a complex result whose diagonal has an imaginary part
above `imag_atol` is an error, smaller imaginary parts (rounding) are dropped.

=======================  =====================================================================
function                 what it computes
=======================  =====================================================================
`feature_statistics`     mean [D] and covariance [D, D] (np.cov, rowvar=False) in float64
`frechet_distance`       the squared Fréchet distance above, a Python float
=======================  =====================================================================
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

FRECHET_SQRT_EPS = 1e-6
"""Added to both covariance diagonals when sqrtm(S1 S2) is not finite."""

FRECHET_IMAG_ATOL = 1e-3
"""Largest |imaginary part| on the diagonal of sqrtm(S1 S2) that is treated as rounding."""


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features must be finite; got NaN or inf entries")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(
        features.shape[1], features.shape[1]
    )


def _check_statistics(name: str, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    """Return (mu [D], sigma [D, D]) as float64, raising ValueError on bad shapes or values."""
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"mu{name} must be [D] and sigma{name} [D, D]; got {mu.shape} and {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name} and sigma{name} must be finite")
    return mu, sigma


def frechet_distance(
    mu1,
    sigma1,
    mu2,
    sigma2,
    eps: float = FRECHET_SQRT_EPS,
    imag_atol: float = FRECHET_IMAG_ATOL,
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, FID formula)."""
    mu1, sigma1 = _check_statistics("1", mu1, sigma1)
    mu2, sigma2 = _check_statistics("2", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1 and mu2 must have the same dimension, got {mu1.shape} and {mu2.shape}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")

    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(root)):
        shift = eps * np.eye(mu1.shape[0])
        root = scipy.linalg.sqrtm((sigma1 + shift) @ (sigma2 + shift))
    if np.iscomplexobj(root):
        worst = float(np.max(np.abs(np.diagonal(root).imag)))
        if worst > imag_atol:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has imaginary diagonal parts up to {worst:.3g} "
                f"(allowed: {imag_atol}); the covariances are not valid or too ill-conditioned"
            )
        root = root.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))

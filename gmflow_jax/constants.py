"""Named constants of the GMFlow math, exactly as in `docs/math.md` §8.4 (one place for every epsilon)."""

NUM_TIMESTEPS = 1000.0
"""T: time units; sigma = t / T, and the network's time input lies in [0, T] (§1.1)."""

PRODUCT_EPS = 1e-6
"""Floor of the product normalizer v + rho s^2 in GM x Gaussian (§2.5) and re-targeting (§3.4)."""

QUOTIENT_EPS = 1e-6
"""Absolute floor of the normalizer p1 v2 + p2 v1 of a Gaussian product/quotient (§2.6)."""

SIGMA_LOG_EPS = 1e-6
"""Floor of sigma inside log(sigma) in the u -> x0 conversion (§3.1)."""

TRANSITION_EPS = 1e-6
"""Floors of sigma, alpha' in r_sigma, r_alpha and of sigma*c2 (a std) and c3 (a variance) in logs (§3.3)."""

RETARGET_EPS = 1e-6
"""Floor of the re-targeting denominator D (§3.4)."""

NLL_INV_STD_EPS = 1e-4
"""The transition NLL caps the inverse std at 1 / NLL_INV_STD_EPS = 1e4 (§4.2)."""

TRAIN_T_EPS = 1e-4
"""Training t_high >= 1e-4 and t_low <= t_high - 1e-4, in t units (§4.1)."""

GUIDANCE_EPS = 1e-6
"""Floors of <m_c, m_c>, the bias powers P, P_a, V-bar, the variance factor and norm ratios (§5.3, §5.5)."""

NEWTON_STEPS = 16
"""Newton iterations of the 1-D GM inverse CDF in KR transport (§2.9)."""

NEWTON_PDF_EPS = 1e-6
"""Floor of the pdf in the Newton step (§2.9)."""

NEWTON_MAX_STEP = 1.5
"""Newton step cap, in component stds (§2.9)."""

ERFINV_EPS = 1e-6
"""erfinv argument clip to +-(1 - 1e-6) (§2.9, §2.10)."""

SDE_LARGE_VAR_EPS = 1e-6
"""Floor of alpha^2 + sigma^2 in the large-variance GM-SDE std (§5.1)."""

SPECTRAL_T_EPS = 1e-6
"""Floor of t in the true velocity of the spectral loss (§4.3)."""

LIKELIHOOD_T_EPS = 1e-4
"""Likelihood evaluation uses t = T * max(U, 1e-4) (§5.10)."""

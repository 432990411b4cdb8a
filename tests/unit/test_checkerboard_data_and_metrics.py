"""Checkerboard data (§4.8, oracle §9.33), its metrics and its histogram figure (§4.9).

Oracles are independent of the code under test: the floor formula of oracle 33 in float64,
closed-form Gaussian and uniform bin masses (scipy's normal CDF, interval overlaps), fine-grid
integration, numpy's own histogram2d, exact translation identities of W1, and tolerances derived
from the sample size (binomial standard deviations; Jensen bounds and McDiarmid's inequality for
the histogram TV).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.stats import norm

from gmflow_jax.data.checkerboard import (
    WHITE_CELLS,
    checkerboard_batch,
    checkerboard_batches,
    checkerboard_from_uniforms,
    is_in_white_cell,
    sample_checkerboard,
)
from gmflow_jax.eval import figures
from gmflow_jax.eval.checkerboard import (
    checkerboard_metrics,
    coverage,
    exact_bin_masses,
    exact_sample_floor,
    histogram_edges,
    histogram_tv,
    in_square_rate,
    nonfinite_rate,
    sliced_w1,
    sliced_w1_directions,
)
from gmflow_jax.eval.figures import histogram_grid_png, histogram_image

# Probability 1e-6 tail for the rigorous deviation bounds below.
_DELTA = 1e-6

# The one sample size the jitted sampler is called with (each new size costs a ~1.5 s compile).
N = 100_000


def _floor_white(x: np.ndarray) -> np.ndarray:
    """Oracle 33's test in float64: on [-4, 4)^2 and floor((x1+4)/2) + floor((x2+4)/2) even."""
    x = np.asarray(x, np.float64)
    on_board = np.all((x >= -4) & (x < 4), axis=-1)
    with np.errstate(invalid="ignore"):
        k = np.floor((np.nan_to_num(x, nan=100.0) + 4) / 2)
    return on_board & ((k[..., 0] + k[..., 1]) % 2 == 0)


def _exact(n: int, seed: int) -> np.ndarray:
    """n exact checkerboard samples as float64 numpy, drawn in chunks of N."""
    key = jax.random.key(seed)
    chunks = [sample_checkerboard(jax.random.fold_in(key, k), N) for k in range(-(-n // N))]
    return np.concatenate([np.asarray(c, np.float64) for c in chunks])[:n]


def _uniform_square(n: int, seed: int, half_width: float = 4.0) -> np.ndarray:
    """n points uniform on [-half_width, half_width]^2."""
    return np.random.default_rng(seed).uniform(-half_width, half_width, (n, 2))


def _tv_interval(q: np.ndarray, p: np.ndarray, n: int) -> tuple[float, float]:
    """A 1 - _DELTA interval for the histogram TV of n samples with true bin masses q vs masses p.

    With p_hat_k = count_k / n: |E p_hat_k - p_k| <= E|p_hat_k - p_k| <= sqrt((q_k-p_k)^2 + var_k)
    (Jensen twice), var_k = q_k (1 - q_k) / n. Moving one sample changes the TV by <= 1/n, so
    McDiarmid bounds the deviation from the mean by sqrt(log(2/delta) / (2 n)).
    """
    var = q * (1 - q) / n
    lower = 0.5 * np.abs(q - p).sum()
    upper = 0.5 * np.sqrt((q - p) ** 2 + var).sum()
    margin = math.sqrt(math.log(2 / _DELTA) / (2 * n))
    return lower - margin, upper + margin


def _with_outside_bin(masses: np.ndarray) -> np.ndarray:
    """Flattened bin masses with the outside bin (1 - sum) appended."""
    flat = masses.ravel()
    return np.append(flat, max(0.0, 1.0 - flat.sum()))


def _gaussian_bin_masses(edges: np.ndarray, std: float) -> np.ndarray:
    """Bin masses of N(0, std^2 I) on edges x edges, with the outside bin appended."""
    mass_1d = np.diff(norm.cdf(edges / std))
    return _with_outside_bin(np.outer(mass_1d, mass_1d))


def _uniform_bin_masses(edges: np.ndarray) -> np.ndarray:
    """Bin masses of the uniform law on [-4, 4]^2 (1-D overlaps with [-4, 4]), outside appended."""
    overlap = np.clip(np.minimum(edges[1:], 4.0) - np.maximum(edges[:-1], -4.0), 0.0, None)
    return _with_outside_bin(np.outer(overlap, overlap) / 64.0)


def _checkerboard_bin_masses() -> np.ndarray:
    """The module's exact masses on the default TV grid, outside bin (mass 0) appended."""
    edges = histogram_edges()
    return _with_outside_bin(exact_bin_masses(edges, edges))


# ----------------------------------------------------------------------------------------------
# Data


def test_sampler_oracle33_all_in_white_cells_with_uniform_marginals():
    n = 200_000
    x = _exact(n, seed=0)
    assert _floor_white(x).all()
    # Each coordinate is U[-4, 4): mean 0, variance 16/3, E x^4 = 256/5.
    sd_mean = math.sqrt(16 / 3 / n)
    sd_var = math.sqrt((256 / 5 - (16 / 3) ** 2) / n)
    np.testing.assert_array_less(np.abs(x.mean(axis=0)), 5 * sd_mean)
    np.testing.assert_array_less(np.abs((x**2).mean(axis=0) - 16 / 3), 5 * sd_var + 5 * sd_mean)
    # Unit-width marginal bins each hold 1/8, and each of the 8 white cells holds 1/8.
    sd_frac = math.sqrt(1 / 8 * 7 / 8 / n)
    for d in range(2):
        frac = np.histogram(x[:, d], bins=8, range=(-4, 4))[0] / n
        np.testing.assert_array_less(np.abs(frac - 1 / 8), 5 * sd_frac)
    cells = np.floor((x + 4) / 2).astype(int)
    cell_frac = np.array([np.mean((cells == c).all(axis=1)) for c in WHITE_CELLS])
    np.testing.assert_array_less(np.abs(cell_frac - 1 / 8), 5 * sd_frac)


def test_sampler_shape_dtype_key_dependence_and_jit():
    key = jax.random.key(3)
    x = sample_checkerboard(key, N)
    assert x.shape == (N, 2) and x.dtype == jnp.float32
    np.testing.assert_array_equal(x, sample_checkerboard(key, N))
    assert not np.array_equal(x, sample_checkerboard(jax.random.key(4), N))
    jitted = jax.jit(sample_checkerboard, static_argnums=1)(key, N)
    np.testing.assert_array_equal(jitted, x)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be"):
            sample_checkerboard(key, bad)


def test_from_uniforms_keeps_u_extremes_inside_their_half_open_cell():
    largest_below_one = np.nextafter(np.float32(1), np.float32(0))
    cells = np.arange(8)
    corner = 2.0 * WHITE_CELLS - 4.0
    for u_value in (0.0, largest_below_one, 1.0):
        x = np.asarray(checkerboard_from_uniforms(cells, np.full((8, 2), u_value, np.float32)))
        assert np.all((x >= corner) & (x < corner + 2)), (u_value, x)
    x0 = np.asarray(checkerboard_from_uniforms(cells, np.zeros((8, 2), np.float32)))
    np.testing.assert_array_equal(x0, 2.0 * WHITE_CELLS - 4.0)  # u = 0 gives the lower corner


def test_is_in_white_cell_matches_floor_rule_borders_and_nonfinite():
    pts = np.array(
        [
            [-4.0, -4.0],  # lower-left corner of white cell (0, 0)
            [-2.0, -4.0],  # cell (1, 0): black
            [np.nextafter(-2.0, -3.0), -4.0],  # still cell (0, 0)
            [4.0, 0.0],  # right border: off the board
            [3.99, -0.01],  # cell (3, 1): white
            [-4.0 - 1e-9, -3.0],  # just left of the board
            [np.nan, 0.0],
            [np.inf, np.inf],
            [-np.inf, -3.0],
        ]
    )
    expected = [True, False, True, False, True, False, False, False, False]
    np.testing.assert_array_equal(is_in_white_cell(pts), expected)
    rand = np.random.default_rng(1).uniform(-5, 5, (5000, 2))
    np.testing.assert_array_equal(is_in_white_cell(rand), _floor_white(rand))
    rand32 = rand.astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(is_in_white_cell)(jnp.asarray(rand32))), _floor_white(rand32)
    )
    assert is_in_white_cell(np.zeros((3, 4, 2))).shape == (3, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        is_in_white_cell(np.zeros((4, 3)))


def test_batches_have_model_layout_and_depend_only_on_key_and_step():
    key = jax.random.key(5)
    it = checkerboard_batches(key, N)
    batches = [next(it) for _ in range(3)]
    for step, b in enumerate(batches):
        assert b.shape == (N, 1, 1, 2) and b.dtype == jnp.float32
        np.testing.assert_array_equal(b, checkerboard_batch(key, step, N))
        np.testing.assert_array_equal(
            b.reshape(N, 2), sample_checkerboard(jax.random.fold_in(key, step), N)
        )
    assert not np.array_equal(batches[0], batches[1])
    np.testing.assert_array_equal(next(checkerboard_batches(key, N, start_step=2)), batches[2])
    with pytest.raises(ValueError, match="start_step"):
        next(checkerboard_batches(key, N, start_step=-1))
    with pytest.raises(ValueError, match="batch_size"):
        checkerboard_batch(key, 0, 0)


# ----------------------------------------------------------------------------------------------
# Exact bin masses


def test_exact_bin_masses_sum_to_one_and_match_fine_grid_integration():
    edges = histogram_edges()
    masses = exact_bin_masses(edges, edges)
    assert masses.shape == (64, 64)
    assert abs(masses.sum() - 1.0) < 1e-12
    # Midpoint rule on m x m points per bin with the oracle-33 indicator: a bin crossed by one cell
    # border per axis has its white area wrong by at most (bin width)(sub-width) per crossing.
    m = 40
    width = edges[1] - edges[0]
    sub = width / m
    mids = edges[0] + sub * (np.arange(64 * m) + 0.5)
    white = _floor_white(np.stack(np.broadcast_arrays(mids[:, None], mids[None, :]), axis=-1))
    brute = white.reshape(64, m, 64, m).sum(axis=(1, 3)) * sub**2 / 32
    np.testing.assert_array_less(np.abs(brute - masses), 2 * width * sub / 32 + 1e-15)
    assert np.abs(brute - masses).max() > 0  # bins straddle cell borders: not a trivial grid


def test_exact_bin_masses_on_aligned_and_oversized_grids():
    sub = np.linspace(-4, 4, 17)  # the 0.5 x 0.5 coverage sub-cells
    masses = exact_bin_masses(sub, sub)
    k = np.arange(16) // 4
    white = (k[:, None] + k[None, :]) % 2 == 0
    np.testing.assert_allclose(masses[white], 1 / 128, rtol=1e-14)
    np.testing.assert_array_equal(masses[~white], 0.0)
    np.testing.assert_allclose(exact_bin_masses([-10, 10], [-10, 10]), [[1.0]], rtol=1e-15)
    # Non-square bins: the left half of the board holds half the mass.
    np.testing.assert_allclose(exact_bin_masses([-4, 0, 4], [-9, 9]).ravel(), [0.5, 0.5])
    with pytest.raises(ValueError, match="edges_x"):
        exact_bin_masses([0.0, 0.0, 1.0], [0.0, 1.0])


# ----------------------------------------------------------------------------------------------
# In-square rate


def test_in_square_rate_exact_uniform_gaussian_shifted_and_nonfinite():
    n = 100_000
    exact = _exact(n, seed=10)
    assert in_square_rate(exact) == 1.0
    assert in_square_rate(sample_checkerboard(jax.random.key(10), N)) == 1.0  # jax input
    sd = math.sqrt(0.25 / n)
    assert abs(in_square_rate(_uniform_square(n, seed=11)) - 0.5) < 5 * sd
    # A shift by 0.5 along x moves a quarter of every cell onto a black cell or off the board.
    assert abs(in_square_rate(exact + [0.5, 0.0]) - 0.75) < 5 * sd
    std = 1.5
    gauss = np.random.default_rng(12).normal(0, std, (n, 2))
    lo = np.arange(4) * 2.0 - 4
    cell_mass = norm.cdf((lo + 2) / std) - norm.cdf(lo / std)
    p_white = sum(cell_mass[i] * cell_mass[j] for i, j in WHITE_CELLS)
    assert abs(in_square_rate(gauss) - p_white) < 5 * math.sqrt(p_white * (1 - p_white) / n)
    bad = exact[:1000].copy()
    bad[:100, 0] = np.nan
    bad[100:150, 1] = -np.inf
    assert in_square_rate(bad) == 0.85
    assert nonfinite_rate(bad) == pytest.approx(0.15, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# Histogram TV


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_histogram_tv_of_exact_sample_is_its_finite_sample_floor(n):
    # E|p_hat_k - p_k| ~ sqrt(2/pi) sd_k (normal approximation; >= 54 expected counts per bin).
    # Var(TV) ~ (1 - 2/pi) / (4 n), sd ~ 0.3 / sqrt(n) = 1.7% of the floor: allow 8%.
    p = _checkerboard_bin_masses()
    floor = 0.5 * math.sqrt(2 / math.pi) * np.sqrt(p * (1 - p) / n).sum()
    tv = histogram_tv(_exact(n, seed=20))
    assert abs(tv - floor) < 0.08 * floor
    lo, hi = _tv_interval(p, p, n)
    assert lo <= tv <= hi


def test_histogram_tv_of_wrong_distributions_matches_their_exact_binned_tv():
    n = 200_000
    edges = histogram_edges()
    p = _checkerboard_bin_masses()
    cases = {
        "uniform": (_uniform_square(n, seed=21), _uniform_bin_masses(edges)),
        "gaussian": (
            np.random.default_rng(22).normal(0, 1.5, (n, 2)),
            _gaussian_bin_masses(edges, 1.5),
        ),
        "shifted": (
            _exact(n, seed=23) + [0.5, 0.0],
            _with_outside_bin(exact_bin_masses(edges - 0.5, edges)),
        ),
    }
    for name, (samples, q) in cases.items():
        assert abs(q.sum() - 1) < 1e-12, name
        lo, hi = _tv_interval(q, p, n)
        tv = histogram_tv(samples)
        assert lo <= tv <= hi, (name, lo, tv, hi)
    # Uniform vs checkerboard: continuous TV 1/2; the bins that straddle cell borders mix both
    # colours, each lowering the binned TV by min(white area, black area) / 64.
    tv_uniform = 0.5 * np.abs(_uniform_bin_masses(edges) - p).sum()
    assert 0.45 < tv_uniform < 0.5


def test_histogram_tv_equals_numpy_histogram_tv_with_outside_and_nonfinite_samples():
    x = np.random.default_rng(24).normal(0, 2.5, (50_000, 2))  # ~10% off the grid
    x[:300] = np.nan
    x[300:400, 1] = np.inf
    edges = histogram_edges()
    finite = np.isfinite(x).all(axis=1)
    counts = np.histogram2d(x[finite, 0], x[finite, 1], bins=[edges, edges])[0]
    p_hat = np.append(counts.ravel(), len(x) - counts.sum()) / len(x)
    expected = 0.5 * np.abs(p_hat - _checkerboard_bin_masses()).sum()
    assert histogram_tv(x) == pytest.approx(expected, abs=1e-12)
    assert histogram_tv(np.full((10, 2), np.nan)) == pytest.approx(1.0, abs=1e-12)  # all outside


# ----------------------------------------------------------------------------------------------
# Sliced W1


def test_sliced_w1_of_exact_sample_is_below_its_expectation_bound():
    # E W1(F_n, G_n) <= 2 int sqrt(F(1-F)/n) <= (projected support length <= 8 sqrt 2) / sqrt(n).
    n = 100_000
    w1 = sliced_w1(_exact(n, seed=30), jax.random.key(31))
    assert 0 < w1 < 8 * math.sqrt(2) / math.sqrt(n)


def test_sliced_w1_of_translated_checkerboard_equals_mean_projected_shift():
    # W1 between a law and its translate by s along a direction is |s| exactly; the two finite
    # samples move the estimate by at most their W1 to the law (triangle inequality).
    n = 100_000
    shift = np.array([1.0, 0.0])
    directions = sliced_w1_directions()
    expected = np.abs(directions @ shift).mean()
    w1 = sliced_w1(_exact(n, seed=32) + shift, jax.random.key(33))
    assert abs(w1 - expected) < 8 * math.sqrt(2) / math.sqrt(n)
    # Along x alone the shift is the whole W1; a vertical shift is invisible along x.
    along_x = np.array([[1.0, 0.0]])
    assert sliced_w1(_exact(n, 34) + shift, jax.random.key(35), directions=along_x) == (
        pytest.approx(1.0, abs=4 * math.sqrt(math.pi / n))
    )
    vertical = _exact(n, 36) + [0.0, 2.0]
    assert sliced_w1(vertical, jax.random.key(37), directions=along_x) < 0.1


def test_sliced_w1_drops_nonfinite_samples_and_survives_absurd_ones():
    x = _exact(N, seed=38)
    key = jax.random.key(39)
    few = sliced_w1_directions(10)
    with_nan = np.concatenate([x, np.full((7, 2), np.nan), [[np.inf, 0.0]]])
    assert sliced_w1(with_nan, key, directions=few) == sliced_w1(x, key, directions=few)
    assert sliced_w1(np.full((3, 2), np.nan), key) == math.inf
    huge = x.copy()
    huge[0] = [1e300, -1e300]
    w1_huge = sliced_w1(huge, key, directions=few)
    assert np.isfinite(w1_huge) and w1_huge > 1e12
    d = sliced_w1_directions()
    assert d.shape == (100, 2)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    np.testing.assert_array_equal(d, sliced_w1_directions())
    with pytest.raises(ValueError, match="unit"):
        sliced_w1(x, key, directions=[[1.0, 1.0]])


# ----------------------------------------------------------------------------------------------
# Coverage


def test_coverage_of_exact_half_board_quarter_cells_and_mixtures():
    n = 100_000
    exact = _exact(n, seed=40)
    assert coverage(exact) == 1.0
    # Confined to the left half of the board (4 of 8 cells, at twice their share): exactly 1/2.
    assert coverage(exact[exact[:, 0] < 0]) == 0.5
    # Confined to the lower-left quarter of each cell: 4 of 16 sub-cells per cell.
    assert coverage(np.floor(exact / 2) * 2 + (exact % 2) / 2) == 0.25
    # 60% exact + 40% uniform on [-4, 4]^2: each sub-cell expects 0.8 N / 128 (9 sd above the
    # N / 256 threshold at n = 1e5).
    mix = np.concatenate([exact[: int(0.6 * n)], _uniform_square(n - int(0.6 * n), seed=41)])
    assert coverage(mix) == 1.0


def test_coverage_of_uniform_square_and_gaussian_blob_follows_sub_cell_masses():
    n = 100_000
    # Uniform on [-4, 4]^2 puts exactly the threshold N / 256 in each white sub-cell: a coin flip.
    assert 0.2 <= coverage(_uniform_square(n, seed=42)) <= 0.8
    # N(0, 1.5^2 I): sub-cells whose Gaussian mass is 6 sd above (below) the threshold are surely
    # (surely not) covered.
    std = 1.5
    sub_edges = np.linspace(-4, 4, 17)
    mass_1d = np.diff(norm.cdf(sub_edges / std))
    k = np.arange(16) // 4
    white = (k[:, None] + k[None, :]) % 2 == 0
    mean_counts = n * np.outer(mass_1d, mass_1d)[white]
    threshold = 0.5 * n / 128
    sure_in = np.sum(mean_counts - 6 * np.sqrt(mean_counts) >= threshold)
    sure_out = np.sum(mean_counts + 6 * np.sqrt(mean_counts) < threshold)
    assert sure_in > 20 and sure_out > 20  # the test discriminates
    cov = coverage(np.random.default_rng(43).normal(0, std, (n, 2)))
    assert sure_in / 128 <= cov <= 1 - sure_out / 128


def test_coverage_counts_nonfinite_samples_in_n():
    exact = _exact(N, seed=44)
    nan_rows = np.full((N // 2, 2), np.nan)  # sub-cells now hold 2/3 of their expected count
    assert coverage(np.concatenate([exact, nan_rows])) == 1.0
    many_nan = np.full((3 * N, 2), np.nan)  # now 1/4 of the expected count
    assert coverage(np.concatenate([exact, many_nan])) == 0.0


# ----------------------------------------------------------------------------------------------
# All metrics together


def test_checkerboard_metrics_agree_with_single_metrics_and_exact_floor():
    x = _exact(N, seed=50)
    key = jax.random.key(51)
    m = checkerboard_metrics(x, key)
    assert m == {
        "in_square_rate": in_square_rate(x),
        "histogram_tv": histogram_tv(x),
        "sliced_w1": sliced_w1(x, key),
        "coverage": coverage(x),
        "nonfinite_rate": 0.0,
        "num_samples": float(N),
    }
    key_floor = jax.random.key(52)
    key_sample, key_metric = jax.random.split(key_floor)
    floor = exact_sample_floor(N, key_floor)
    assert floor == checkerboard_metrics(sample_checkerboard(key_sample, N), key_metric)
    assert floor["in_square_rate"] == 1.0 and floor["coverage"] == 1.0
    all_nan = checkerboard_metrics(np.full((4, 2), np.nan), key)
    assert all_nan == {
        "in_square_rate": 0.0,
        "histogram_tv": pytest.approx(1.0, abs=1e-12),
        "sliced_w1": math.inf,
        "coverage": 0.0,
        "nonfinite_rate": 1.0,
        "num_samples": 4.0,
    }
    for bad in (np.zeros((5, 3)), np.zeros((0, 2)), np.zeros(4)):
        with pytest.raises(ValueError, match="samples must have shape"):
            checkerboard_metrics(bad, key)


# ----------------------------------------------------------------------------------------------
# Figures


def test_histogram_image_normalization_orientation_and_nonfinite():
    n = 10_000  # count scale 160 * n / 1e6 = 1.6
    x = np.full((n, 2), 100.0)  # off the plot
    x[0] = [-4.19, 4.19]  # one point: bin (x=0, y=199) -> 1/1.6
    x[1:3] = [0.01, 0.01]  # two points: bin (100, 100) -> 2/1.6, clipped to 1
    x[3:10] = np.nan
    img = histogram_image(x)
    assert img.shape == (200, 200)
    assert img[199, 0] == pytest.approx(0.625)
    assert img[100, 100] == 1.0
    assert np.count_nonzero(img) == 2
    # Exact samples fill bins inside white cells to 1e6 (8.4/200)^2 / 32 / 160 whatever N is.
    centres = -4.2 + 8.4 / 200 * (np.arange(200) + 0.5)
    grid = np.stack(np.broadcast_arrays(centres[None, :], centres[:, None]), axis=-1)
    near = 8.4 / 200
    away = np.all(np.abs(np.abs(grid) % 2 - 1) < 1 - near, axis=-1)  # > 1 bin from borders
    white_inner = _floor_white(grid) & away
    outside_white = ~_floor_white(grid) & away
    level = 1e6 * (8.4 / 200) ** 2 / 32 / 160  # ~0.34
    for n_exact in (2 * N, 4 * N):
        img = histogram_image(_exact(n_exact, seed=60))
        assert img[white_inner].mean() == pytest.approx(level, rel=0.01)
        assert np.all(img[outside_white] == 0.0)


def test_histogram_grid_png_size_content_and_atomic_write(tmp_path):
    path = tmp_path / "fig2.png"
    rows, cols = ["Euler", "GM-ODE 2"], [1, 2, 4]
    exact = _exact(N, seed=61)
    grid = {(r, c): exact for r in rows for c in cols if (r, c) != ("Euler", 4)}
    size = histogram_grid_png(path, grid, rows, cols, panel_px=100, title="Checkerboard")
    assert size == (110 + 3 * 100, 30 + 30 + 2 * 100)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert os.listdir(tmp_path) == ["fig2.png"]
    # A drawn panel shows the viridis board; the missing ("Euler", 4) panel is left white.
    drawn = rgb[60 + 5 : 60 + 95, 110 + 5 : 110 + 95]
    blank = rgb[60 + 5 : 60 + 95, 110 + 200 + 5 : 110 + 200 + 95]
    assert drawn.std() > 20 and np.all(blank == 255)
    # Overwriting keeps one file; default sizes give one pixel per histogram bin.
    size = histogram_grid_png(path, {("a", 8): exact}, ["a"], [8])
    with Image.open(path) as im:
        assert im.size == size == (110 + 200, 30 + 200)
    assert os.listdir(tmp_path) == ["fig2.png"]
    with pytest.raises(ValueError, match="grid keys"):
        histogram_grid_png(path, {("b", 8): exact}, ["a"], [8])


def test_histogram_grid_png_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(figures.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        histogram_grid_png(path, {("a", 1): np.zeros((4, 2))}, ["a"], [1])
    assert os.listdir(tmp_path) == ["fig.png"] and path.read_bytes() == b"old"

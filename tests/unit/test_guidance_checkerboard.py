"""The class-conditional checkerboard (issue 16): its data, the toy MLP's label table, and the exact
guidance metrics against exact samples and known wrong distributions.

Oracles are independent of the code under test: the cell of a point from floor((x + 4) / 2) in
float64, the white-cell numbering re-enumerated here, scipy's KS and chi-square tests, closed-form
bin masses, distances and moments of uniform squares, the exact mean absolute deviation of a
binomial (scipy's pmf), and brute-force dominance. Tolerances come from the sample size: binomial
standard deviations, Jensen's bound on the expected TV and McDiarmid's inequality for its deviation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.config_files import load_config
from scipy import stats

from gmflow_jax.data.checkerboard import (
    checkerboard_batch,
    labeled_checkerboard_batch,
    sample_checkerboard,
    sample_checkerboard_class,
    sample_checkerboard_labeled,
)
from gmflow_jax.eval.guidance_checkerboard import (
    CELL_BINS,
    frontier_precision_at,
    frontier_tv_at,
    guidance_metrics,
    pareto_frontier,
    uniform_histogram_tv_floor,
)
from gmflow_jax.eval.guidance_checkerboard_sweep import guidance_settings, method_name
from gmflow_jax.models.toy_mlp import ToyMLP
from gmflow_jax.parallel.mesh import MeshConfig, make_mesh
from gmflow_jax.tasks.checkerboard_classes import CheckerboardClassesTask
from gmflow_jax.train.state import drop_labels
from gmflow_jax.train.step import step_settings
from gmflow_jax.train.task import BatchLayout, run_keys

_DELTA = 1e-6  # tail probability of the rigorous deviation bounds
_PER_CLASS = 4000
_N = 8 * _PER_CLASS
_BINS = CELL_BINS**2

# The white cells re-enumerated independently: (i, j) with i along x, j along y, i + j even, in
# row-major order of i then j (the documented numbering of classes 0..7).
_CELLS = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
_LOWER = np.array([(2.0 * i - 4.0, 2.0 * j - 4.0) for i, j in _CELLS])


def _labels() -> np.ndarray:
    return np.repeat(np.arange(8, dtype=np.int32), _PER_CLASS)


def _exact(seed: int = 0) -> np.ndarray:
    """Exact class-conditional samples of `_labels()` drawn here: corner + 2 U (float64 numpy)."""
    u = np.random.default_rng(seed).uniform(0.0, 1.0, (_N, 2))
    return _LOWER[_labels()] + 2.0 * u


def _mcdiarmid_per_class_mean(per_class: int) -> float:
    """Deviation bound of a mean over 8 classes of per-class TVs (each sample moves its class's
    TV by <= 1/n, the mean by <= 1/(8 n)): sqrt(log(2/delta) / (16 n))."""
    return math.sqrt(math.log(2 / _DELTA) / (16 * per_class))


def _expected_uniform_tv(n: int, bins: int = _BINS) -> float:
    """E[TV] of n uniform samples over equal bins: 0.5 * bins * E|Bin(n, 1/bins)/n - 1/bins|,
    the binomial's mean absolute deviation summed exactly from scipy's pmf."""
    k = np.arange(n + 1)
    mad = np.sum(stats.binom.pmf(k, n, 1.0 / bins) * np.abs(k / n - 1.0 / bins))
    return 0.5 * bins * mad


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def test_labeled_sampler_points_are_the_unconditional_samplers_bit_for_bit():
    key = jax.random.PRNGKey(3)
    x, _ = sample_checkerboard_labeled(key, 1000)
    assert np.asarray(x).tobytes() == np.asarray(sample_checkerboard(key, 1000)).tobytes()
    xb, yb = labeled_checkerboard_batch(key, 7, 256)
    assert np.asarray(xb).tobytes() == np.asarray(checkerboard_batch(key, 7, 256)).tobytes()
    assert yb.shape == (256,) and yb.dtype == jnp.int32


def test_labels_are_the_cell_each_point_lies_in_and_classes_are_equally_likely():
    x, y = sample_checkerboard_labeled(jax.random.PRNGKey(0), _N)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    ij = np.floor((x + 4.0) / 2.0).astype(int)
    expected = np.array([_CELLS.index((a, b)) for a, b in ij])
    np.testing.assert_array_equal(y, expected)
    counts = np.bincount(y, minlength=8)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_each_class_is_uniform_on_its_cell():
    x, y = sample_checkerboard_labeled(jax.random.PRNGKey(1), _N)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    for c in range(8):
        u = (x[y == c] - _LOWER[c]) / 2.0
        assert np.all((u >= 0) & (u < 1))
        for d in range(2):
            assert stats.kstest(u[:, d], "uniform").pvalue > 1e-4
        cells = np.floor(u * 4).astype(int)
        counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-4


def test_class_sampler_draws_the_requested_cells_uniformly():
    labels = _labels()
    x = np.asarray(sample_checkerboard_class(jax.random.PRNGKey(2), labels), np.float64)
    u = (x - _LOWER[labels]) / 2.0
    assert np.all((u >= 0) & (u < 1))
    for c in (0, 5):
        assert stats.kstest(u[labels == c, 0], "uniform").pvalue > 1e-4
        assert stats.kstest(u[labels == c, 1], "uniform").pvalue > 1e-4
    # The two coordinates are independent: uniform on the square, not on a diagonal.
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 6 / math.sqrt(_N)


@pytest.mark.parametrize("labels", [[8], [-1], [0.5], [[0, 1]]])
def test_class_sampler_rejects_labels_without_a_cell(labels):
    with pytest.raises(ValueError, match="labels"):
        sample_checkerboard_class(jax.random.PRNGKey(0), np.asarray(labels))


def test_classes_config_drops_labels_to_the_null_label_at_rate_one_minus_prob_class():
    config = load_config("checkerboard", "tiny_classes")
    _, _, loss = step_settings(config)
    assert loss.null_label == 8 and loss.prob_class == pytest.approx(0.9)
    n = 100_000
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 8, n), jnp.int32)
    dropped = np.asarray(drop_labels(jax.random.PRNGKey(5), labels, loss.prob_class, 8))
    null = dropped == 8
    sigma = math.sqrt(0.1 * 0.9 / n)
    assert abs(null.mean() - 0.1) < 6 * sigma
    np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])


# ------------------------------------------------------------------------------------------------
# The toy MLP's label table
# ------------------------------------------------------------------------------------------------


def test_conditional_toy_mlp_has_the_unconditional_trunk_plus_a_label_table():
    uncond = ToyMLP(4, embed_dim=16, hidden_dim=32, num_layers=2, rngs=nnx.Rngs(0))
    cond = ToyMLP(4, embed_dim=16, hidden_dim=32, num_layers=2, num_classes=8, rngs=nnx.Rngs(0))
    assert not hasattr(uncond, "label_embed")
    assert cond.label_embed.embedding.value.shape == (9, 16)  # 8 classes + the null label
    sa, sb = dict(nnx.state(uncond).flat_state()), dict(nnx.state(cond).flat_state())
    shared = [k for k in sb if k[0] != "label_embed"]
    assert sorted(shared) == sorted(sa)
    for k in shared:
        np.testing.assert_array_equal(np.asarray(sa[k].value), np.asarray(sb[k].value))
    x = jnp.ones((3, 1, 1, 2))
    t = jnp.full((3,), 500.0)
    out = [np.asarray(cond(x, t, jnp.full((3,), c, jnp.int32)).means) for c in (0, 8)]
    assert not np.allclose(out[0], out[1])  # the label reaches the output
    with pytest.raises(ValueError, match="labels"):
        cond(x, t, None)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_tv_floor_matches_the_exact_binomial_expectation():
    for n in (50, 500, 4000):
        exact = _expected_uniform_tv(n)
        # 64 multinomial draws; TV's std is below 1.5 / sqrt(n) (McDiarmid's sub-Gaussian constant).
        assert uniform_histogram_tv_floor(n) == pytest.approx(exact, abs=6 * 0.5 / math.sqrt(n) / 8)


def test_exact_samples_score_the_floor():
    m = guidance_metrics(_exact(), _labels())
    assert m["precision"] == 1.0
    assert m["overshoot_rate"] == 0.0 and m["overshoot_distance"] == 0.0
    assert m["within_cell_coverage"] == 1.0
    expected = _expected_uniform_tv(_PER_CLASS)
    assert abs(m["within_cell_tv"] - expected) < _mcdiarmid_per_class_mean(_PER_CLASS)
    # Jensen: E TV <= 0.5 sum sqrt(p (1 - p) / n).
    assert expected <= 0.5 * _BINS * math.sqrt((1 / _BINS) * (1 - 1 / _BINS) / _PER_CLASS)
    # Mean squared distance to the centre: 2/3 per sample, variance 8/45 per sample.
    assert abs(m["concentration"] ** 2 - 1.0) < 6 * math.sqrt(8 / 45 / _N) / (2 / 3)


def test_a_shrunken_cell_is_precise_but_concentrated_and_uncovered():
    # Uniform on the central square of side 1 of each cell: exactly the 4 x 4 central fine bins.
    u = np.random.default_rng(1).uniform(0.25, 0.75, (_N, 2))
    x = _LOWER[_labels()] + 2.0 * u
    m = guidance_metrics(x, _labels())
    assert m["precision"] == 1.0
    # 16 of 64 bins hold everything: TV = 0.5 (16 (1/16 - 1/64) + 48 / 64) = 0.75 once every
    # central bin holds >= 1/64 of the samples (expected 1/16; certain at this n).
    assert m["within_cell_tv"] == pytest.approx(0.75, abs=1e-12)
    assert m["within_cell_coverage"] == 0.25  # the 4 central sub-cells of 16
    # RMS radius scales with the side: 1/2 of the uniform's.
    assert abs(m["concentration"] - 0.5) < 6 * 0.5 * math.sqrt(8 / 45 / _N) / (2 / 3)
    assert m["overshoot_rate"] == 0.0


def test_a_shifted_cell_loses_precision_and_overshoots_at_the_corner():
    labels = _labels()
    shift = np.array([0.5, 0.25])
    u = np.random.default_rng(2).uniform(0.0, 1.0, (_N, 2))
    x = _LOWER[labels] + 2.0 * u + shift
    m = guidance_metrics(x, labels)
    q = (1 - shift[0] / 2) * (1 - shift[1] / 2)  # the overlap of the shifted and the true cell
    assert abs(m["precision"] - q) < 6 * math.sqrt(q * (1 - q) / _N)
    # In-cell samples are uniform on [0.5, 2) x [0.25, 2): 6 x 7 = 42 fine bins of mass 1/42.
    p = np.full(_BINS, 1 / _BINS)
    truth = np.zeros((CELL_BINS, CELL_BINS))
    truth[2:, 1:] = 1 / 42
    truth = truth.ravel()
    n_in = q * _PER_CLASS
    lower = 0.5 * np.abs(truth - p).sum()
    upper = 0.5 * np.sqrt((truth - p) ** 2 + truth * (1 - truth) / n_in).sum()
    dev = _mcdiarmid_per_class_mean(int(0.9 * n_in))
    assert lower - dev < m["within_cell_tv"] < upper + dev
    assert lower == pytest.approx(0.34375)
    # Shifted up-right, only the cells on the top or right edge leave the box: classes whose cell
    # has i = 3 or j = 3. Top-right corner cell (3, 3): beyond with prob 1 - 0.75 * 0.875.
    edge = np.array([3 in c for c in _CELLS])
    beyond_prob = np.where(
        [c == (3, 3) for c in _CELLS],
        1 - 0.75 * 0.875,
        np.where(
            [c[0] == 3 for c in _CELLS], 0.25, np.where([c[1] == 3 for c in _CELLS], 0.125, 0)
        ),
    )
    assert edge.sum() == 3  # (1, 3), (3, 1), (3, 3)
    rate = beyond_prob.mean()
    assert abs(m["overshoot_rate"] - rate) < 6 * math.sqrt(rate * (1 - rate) / _N)
    for c in range(8):
        b = beyond_prob[c]
        assert abs(m["overshoot_rate_per_class"][c] - b) <= 6 * math.sqrt(b * (1 - b) / _PER_CLASS)
        assert abs(m["precision_per_class"][c] - q) < 6 * math.sqrt(q * (1 - q) / _PER_CLASS)


def test_overshoot_of_a_wider_box_has_the_closed_form_rate_and_distance():
    # Uniform on [-5, 5]^2: beyond [-4, 4]^2 with prob 36/100; given beyond, it lies in one of 4
    # strips (area 8, distance U(0, 1), mean 1/2) or 4 unit corners (mean distance
    # (sqrt 2 + asinh 1) / 3 to the box corner).
    x = np.random.default_rng(3).uniform(-5.0, 5.0, (_N, 2))
    m = guidance_metrics(x, np.zeros(_N, np.int64))
    assert abs(m["overshoot_rate"] - 0.36) < 6 * math.sqrt(0.36 * 0.64 / _N)
    corner = (math.sqrt(2) + math.asinh(1.0)) / 3
    expected = (32 * 0.5 + 4 * corner) / 36
    # The distance is in [0, sqrt 2]: its mean over the ~0.36 N beyond is within 6 sqrt(2/(0.3N)).
    assert abs(m["overshoot_distance"] - expected) < 6 * math.sqrt(2) / math.sqrt(0.3 * _N)


def test_the_unconditional_mixture_has_one_eighth_precision_and_uniform_cells():
    x = np.asarray(sample_checkerboard(jax.random.PRNGKey(4), _N), np.float64)
    labels = _labels()  # requested classes independent of where the points are
    m = guidance_metrics(x, labels)
    assert abs(m["precision"] - 1 / 8) < 6 * math.sqrt((1 / 8) * (7 / 8) / _N)
    # The samples that do land in the requested cell are uniform on it.
    n_in = _PER_CLASS // 8
    expected = _expected_uniform_tv(n_in)
    assert abs(m["within_cell_tv"] - expected) < _mcdiarmid_per_class_mean(n_in // 2) + 0.02
    assert abs(m["within_cell_tv_floor"] - expected) < 0.02
    assert abs(m["concentration"] - 1.0) < 6 * math.sqrt(8 / 45 / (_N / 8)) / (2 / 3)
    assert m["overshoot_rate"] == 0.0


def test_nonfinite_samples_are_outside_every_cell_and_beyond_the_box():
    x = _exact()[:16].copy()
    labels = _labels()[:16]
    x[:4, 0] = np.nan
    x[4:6, 1] = np.inf
    m = guidance_metrics(x, labels)
    assert m["precision"] == pytest.approx(10 / 16)
    assert m["overshoot_rate"] == pytest.approx(6 / 16)
    assert m["overshoot_distance"] == 0.0  # no finite sample is beyond
    assert m["nonfinite_rate"] == pytest.approx(6 / 16)


@pytest.mark.parametrize(
    "labels, match",
    [(np.full(4, 8), "labels must be classes"), (np.zeros(3, np.int32), "labels must be integers")],
)
def test_metrics_reject_labels_without_a_cell_or_of_the_wrong_shape(labels, match):
    with pytest.raises(ValueError, match=match):
        guidance_metrics(np.zeros((4, 2)), labels)


def test_pareto_frontier_is_the_set_of_non_dominated_points():
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = np.round(rng.uniform(0, 1, 30), 1)
        t = np.round(rng.uniform(0, 1, 30), 1)
        front = set(pareto_frontier(p, t))
        for i in range(30):
            dominated = any(
                p[j] >= p[i] and t[j] <= t[i] and (p[j] > p[i] or t[j] < t[i]) for j in range(30)
            )
            duplicate_before = any(p[j] == p[i] and t[j] == t[i] for j in range(i))
            assert (i in front) == (not dominated and not duplicate_before)


def test_frontier_lookups_match_brute_force():
    rng = np.random.default_rng(6)
    p, t = rng.uniform(0, 1, 25), rng.uniform(0, 1, 25)
    levels = np.linspace(-0.1, 1.1, 13)
    for k, level in enumerate(levels):
        ok = t <= level
        want = p[ok].max() if ok.any() else np.nan
        np.testing.assert_equal(frontier_precision_at(p, t, levels)[k], want)
        ok = p >= level
        want = t[ok].min() if ok.any() else np.nan
        np.testing.assert_equal(frontier_tv_at(p, t, levels)[k], want)


# ------------------------------------------------------------------------------------------------
# The task and its sweep settings
# ------------------------------------------------------------------------------------------------


def test_task_batches_are_the_unconditional_batches_with_their_cells_as_labels():
    config = load_config("checkerboard", "tiny_classes")
    keys = run_keys(0)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices())
    layout = BatchLayout(mesh, 64, np.arange(64))
    batches = CheckerboardClassesTask(config, keys).batches(3, layout)
    for step in (3, 4):
        batch = next(batches)
        want = np.asarray(checkerboard_batch(keys["data"], step, 64))
        assert np.asarray(batch["x0"]).tobytes() == want.tobytes()
        ij = np.floor((want.reshape(64, 2).astype(np.float64) + 4.0) / 2.0).astype(int)
        np.testing.assert_array_equal(
            np.asarray(batch["labels"]), [_CELLS.index((a, b)) for a, b in ij]
        )


@pytest.mark.parametrize(
    "field, value, match",
    [("model.num_classes", 10, "num_classes must be 8"), ("train.prob_class", 1.0, "prob_class")],
)
def test_task_rejects_configs_that_cannot_guide(field, value, match):
    config = load_config("checkerboard", "tiny_classes")
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=match):
        CheckerboardClassesTask(config, run_keys(0))


def test_sweep_settings_pair_each_model_with_its_guidance_and_the_null_label():
    config = load_config("checkerboard", "classes")
    config.sample.gm_cfg_rows = ("gm_sde_2",)
    s = config.sample
    gm = guidance_settings(config, mean_only=False)
    base = guidance_settings(config, mean_only=True)
    n_nfe = len(s.guidance_nfes)
    assert len(gm) == n_nfe * (len(s.gm_rows) * len(s.guidance_scales) + len(s.cfg_scales))
    assert len(base) == n_nfe * len(s.baseline_solvers) * len(s.cfg_scales)
    for setting in gm + base:
        cfg = setting.cfg
        kind = cfg.guidance
        assert cfg.guided == (setting.w > (1.0 if kind == "cfg" else 0.0))
        assert cfg.null_label == 8 and cfg.orthogonal_guidance == 0.0
        assert cfg.num_steps == setting.nfe
        if cfg.solver == "gm_ode":
            assert cfg.num_substeps == math.ceil(128 / setting.nfe)
        if setting.row in s.baseline_solvers:
            assert kind == "cfg"
    methods = {method_name(x.row, x.cfg.guidance) for x in gm}
    assert methods == {"gm_sde_2", "gm_ode_2", "gm_sde_2+cfg"}
    assert {x.w for x in gm if x.cfg.guidance == "probabilistic"} == set(s.guidance_scales)

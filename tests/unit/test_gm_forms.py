"""The XLA:CPU forms of the GM math equal the straightforward forms the other backends trace.

`gm.cpu_reformulations()` picks, while tracing, between unrolled / sliced / dot forms (CPU) and
native reductions (GPU, TPU). The tests run on the CPU, so without this file only the CPU forms
would be checked. Here every GM operation that goes through the switch is traced both ways with
`gm.forced_forms` and compared in float64 (the two forms are the same arithmetic in another order:
agreement to 1e-12 relative), values and gradients, including the extreme inputs the CPU forms
guard against (a point far from every component, -inf log-weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.gm_inputs import random_gm
from helpers.numerics import to_jax

from gmflow_jax import flow, losses
from gmflow_jax import gm as G

KC = [(1, 1), (3, 2), (8, 4), (12, 3)]  # 12 > WEIGHTED_SUM_UNROLL_MAX: the dot form of the sums


def _both_forms(fn, *args):
    """`fn(*args)` traced with the CPU forms and with the generic forms, in float64."""
    outs = []
    with jax.enable_x64(True):
        jargs = to_jax(args, jnp.float64)
        for cpu in (True, False):
            with G.forced_forms(cpu):
                # a fresh function per form: jit caches traces by function, not by the switch
                outs.append(jax.tree.map(np.asarray, jax.jit(lambda *a: fn(*a))(*jargs)))
    return outs


def _assert_forms_agree(fn, *args, rtol=1e-12, atol=1e-12):
    cpu, generic = _both_forms(fn, *args)
    for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(generic), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _gm(means, lw, ls):
    return G.GM(means, lw, ls)


def test_forced_forms_switches_the_traced_form():
    # the switch is real: the CPU form of a K=8 weighted sum has no reduce, the generic one does
    w, x = jnp.ones((4, 8)), jnp.ones((4, 8, 3))
    with G.forced_forms(True):
        cpu_text = jax.jit(lambda a, b: G.weighted_sum(a, b)).lower(w, x).as_text()
    with G.forced_forms(False):
        generic_text = jax.jit(lambda a, b: G.weighted_sum(a, b)).lower(w, x).as_text()
    assert "reduce" not in cpu_text and "reduce" in generic_text
    assert G.cpu_reformulations() == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("k,c", KC)
def test_gm_moments_and_density_agree_across_forms(k, c):
    means, lw, ls = random_gm(np.random.default_rng(k * 10 + c), k=k, c=c)
    x = np.random.default_rng(1).normal(size=means.shape[:-2] + (c,))
    _assert_forms_agree(lambda a, b, s: G.gm_mean(_gm(a, b, s)), means, lw, ls)
    _assert_forms_agree(lambda a, b, s: G.gm_mean(_gm(a, b, s), power=2.5), means, lw, ls)
    _assert_forms_agree(lambda a, b, s: G.gm_to_iso_gaussian(_gm(a, b, s)), means, lw, ls)
    _assert_forms_agree(lambda a, b, s, y: G.gm_logprob(_gm(a, b, s), y), means, lw, ls, x)


@pytest.mark.parametrize("k,c", KC)
def test_gm_products_and_retargeting_agree_across_forms(k, c):
    rng = np.random.default_rng(k * 10 + c + 5)
    means, lw, ls = random_gm(rng, k=k, c=c)
    batch = means.shape[:-2]
    x_src, x_tgt = rng.normal(size=(2,) + batch + (c,))
    var = rng.uniform(0.3, 2.0, size=(batch[0],) + (1,) * len(batch))
    t_src, t_tgt = np.full(batch[0], 800.0), np.full(batch[0], 500.0)
    for p1, p2 in [(1.0, 1.0), (2.0, 0.5), (1.0, -0.5)]:
        _assert_forms_agree(
            lambda a, b, s, m, v, p1=p1, p2=p2: G.gm_mul_iso_gaussian(_gm(a, b, s), m, v, p1, p2),
            means,
            lw,
            ls,
            x_src,
            var,
        )
    for fn in (flow.retarget_gm, flow.retarget_mean):
        _assert_forms_agree(
            lambda a, b, s, xs, xt, ts, tt, fn=fn: fn(_gm(a, b, s), xs, ts, xt, tt),
            means,
            lw,
            ls,
            x_src,
            x_tgt,
            t_src,
            t_tgt,
        )


@pytest.mark.parametrize("k", [3, 64])
def test_transition_nll_and_its_gradient_agree_across_forms(k):
    rng = np.random.default_rng(k)
    means, lw, ls = random_gm(rng, batch=(4, 5), k=k, c=2)
    x = rng.normal(size=(4, 5, 2))

    def loss(a, b, s, y):
        return jnp.mean(losses.gm_nll(_gm(a, b, s), y))

    _assert_forms_agree(loss, means, lw, ls, x)
    _assert_forms_agree(jax.grad(loss, argnums=(0, 1, 2)), means, lw, ls, x)


@pytest.mark.parametrize("axis", [-1, -2])
def test_logsumexp_and_softmax_agree_across_forms_on_extreme_logits(axis):
    # a row with -inf entries, an all -inf row, logits of magnitude 1e11 one ulp-scale apart,
    # and an ordinary row; for axis=-2 the K axis is followed by a size-1 axis (log-weights)
    rows = np.array(
        [
            [-np.inf, 0.3, -np.inf, -1.0],
            [-np.inf] * 4,
            [-3.2e11, -3.2e11 - 6.5e4, -3.25e11, -3.2e11 + 3.3e4],
            [0.1, -2.0, 1.5, 0.7],
        ]
    )
    x = rows if axis == -1 else rows[..., None]
    red = functools.partial(G.axis_logsumexp, axis=axis)
    cpu, generic = _both_forms(red, x)
    np.testing.assert_array_equal(np.isneginf(cpu), np.isneginf(generic))
    finite = np.isfinite(generic)
    np.testing.assert_allclose(cpu[finite], generic[finite], rtol=1e-14)
    # softmax: the all -inf row is undefined (NaN generically); compare the others
    soft_cpu, soft_generic = _both_forms(lambda a: G.axis_softmax(a, -1), rows)
    keep = [0, 2, 3]
    np.testing.assert_allclose(soft_cpu[keep], soft_generic[keep], rtol=1e-12, atol=1e-300)

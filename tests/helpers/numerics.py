"""Numerical test machinery shared by the GM / flow / loss tests: float64 recomputation, finite
differences of a random scalarization, and the jit / vmap / grad / bf16 property check."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

LOG_W_TINY = math.log(1e-30)
"""~ -69.08: the log-weight of a component with weight 1e-30."""


def to_jax(tree, dtype):
    """numpy tree -> jax arrays of `dtype` (call inside `jax.enable_x64(True)` for float64)."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def run64(fn, *args):
    """Run `fn` in float64 on numpy inputs, return numpy outputs."""
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, jax.jit(fn)(*to_jax(args, jnp.float64)))


def run32(fn, *args):
    """Run `fn` in float32 on numpy inputs, return numpy outputs."""
    return jax.tree.map(np.asarray, jax.jit(fn)(*to_jax(args, jnp.float32)))


def rbg_key(seed):
    """A PRNG key of the "rbg" implementation: same API, but XLA:CPU compiles it ~3x faster."""
    return jax.random.key(seed, impl="rbg")


def bcast(t, ndim):
    """numpy: scalar or [B] time -> broadcastable against a rank-`ndim` [B, ...] array."""
    t = np.asarray(t, np.float64)
    return t if t.ndim == 0 else t.reshape(t.shape + (1,) * (ndim - 1))


def _scalarize(out, weights):
    return sum(jnp.sum(o * w) for o, w in zip(jax.tree.leaves(out), weights, strict=True))


weighted_value_and_grad = jax.jit(
    lambda fn, weights, *args: jax.value_and_grad(
        lambda *a: _scalarize(fn(*a), weights), argnums=tuple(range(len(args)))
    )(*args),
    static_argnums=0,
)
"""(value, gradients w.r.t. every argument) of sum_i <weights_i, output leaf i> of `fn(*args)`.

`fn` is static, so each (fn, shapes, dtype) compiles once and is shared by the property and
finite-difference checks of every test module."""


def output_weights(fn, args, rng):
    """One standard-normal array per output leaf of `fn(*args)` (the random scalarization)."""
    return [rng.normal(size=o.shape) for o in jax.tree.leaves(jax.eval_shape(fn, *args))]


def fd_check(fn, args, rng, scales=None):
    """AD gradient vs central finite differences of a random scalarization, in float64.

    One random direction per argument, its entries scaled by `scales[i]` (0 freezes an argument,
    e.g. a time sitting on a floor's kink); the FD quotient is evaluated for several steps and the
    best one must agree to ~1e-6 relative (an AD bug agrees at no step). The float32 gradient at the
    same point must be finite.
    """
    scales = scales or [1.0] * len(args)
    weights = output_weights(fn, args, rng)
    dirs = [rng.normal(size=np.shape(a)) * sc for a, sc in zip(args, scales, strict=True)]
    with jax.enable_x64(True):
        a64, w64 = to_jax(args, jnp.float64), to_jax(weights, jnp.float64)
        _, grads = weighted_value_and_grad(fn, w64, *a64)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        ad = float(sum(jnp.sum(g * d) for g, d in zip(grads, dirs, strict=True)))

        def shifted(h):
            b = [a + h * d for a, d in zip(a64, dirs, strict=True)]
            return float(weighted_value_and_grad(fn, w64, *b)[0])

        errs = [abs((shifted(h) - shifted(-h)) / (2 * h) - ad) for h in (1e-3, 1e-4, 1e-5, 1e-6)]
    assert min(errs) <= 1e-6 * abs(ad) + 1e-9, (ad, errs)
    _, g32 = weighted_value_and_grad(fn, to_jax(weights, jnp.float32), *to_jax(args, jnp.float32))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in g32)


def check_jit_vmap_grad_bf16_float64(fn, args, rng, vmap_scale, float64=True):
    """The transform properties every GM / flow / loss function must have.

    - vmap over a new leading axis (second copy scaled by `vmap_scale`) equals two separate calls;
    - the gradient under jit is finite;
    - bf16 inputs are computed in float32 (output float32, equal to the float32 call on the
      bf16-rounded inputs);
    - the float32 result equals a float64 recomputation (skipped with `float64=False`, for
      functions that draw noise in the input dtype).
    """
    args = [np.asarray(a, np.float32) for a in args]  # exactly representable in both precisions
    args32 = to_jax(args, jnp.float32)
    jitted = jax.jit(fn)
    out32 = jitted(*args32)
    args_b = [a * vmap_scale for a in args32]
    stacked = [jnp.stack([a, b]) for a, b in zip(args32, args_b, strict=True)]
    vm = jax.jit(jax.vmap(fn))(*stacked)
    for i, ref in enumerate((out32, jitted(*args_b))):
        for a, b in zip(jax.tree.leaves(vm), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
    weights = to_jax(output_weights(fn, args32, rng), jnp.float32)
    _, grads = weighted_value_and_grad(fn, weights, *args32)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    args_bf = to_jax(args, jnp.bfloat16)
    out_bf = jitted(*args_bf)
    ref_bf = jitted(*[a.astype(jnp.float32) for a in args_bf])
    for a, b in zip(jax.tree.leaves(out_bf), jax.tree.leaves(ref_bf), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    if float64:
        out64 = run64(fn, *args)
        for a, b in zip(jax.tree.leaves(out32), jax.tree.leaves(out64), strict=True):
            assert a.dtype == jnp.float32 and b.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * (np.max(np.abs(b)) + 1e-3))

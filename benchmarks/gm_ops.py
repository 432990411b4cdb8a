"""Time the jitted GM operations at the ImageNet latent shape and compare with copy bandwidth.

Shape: B=128, H=W=32, C=4, K=8 (the GM means alone are 16.8 MB in float32). For each op the script
reports the median wall time over `--runs` calls (each `block_until_ready`), the bytes it must move
(inputs read + outputs written, counted analytically from the array shapes; an output that is an
unchanged input, e.g. the log-weights returned by `u_to_x0`, is forwarded by JAX without a copy and is
not counted), the achieved GB/s, and that as a percentage of a copy bandwidth measured by the script
itself (a jitted `x + 1` over a float32 array as large as the GM means; it reads and writes every
byte, and its output is a fresh buffer, as every op's is). A second reference, the same copy in
place (input donated, no allocation), is printed beside it: it excludes the cost of mapping a fresh
16.8 MB output, which the allocator pays on some calls and not others, and reads 2-4x higher. Both
run on data that fits in a server CPU's last-level cache (as the ops' inputs do when timed in a
loop), so they measure cache bandwidth as much as memory bandwidth; the third reference is the
machine's main-memory bandwidth, the same in-place copy over `MEMORY_COPY_MB` (STREAM-style: far
larger than the caches).

Element-wise and reduction ops (mean, moment match, log-density, GM x Gaussian, reverse transition,
re-targeted mean, u -> x0) are memory-bound in principle; the random (`gm_sample`), Newton
(`gaussian_to_gm_samples`) and FFT (`hartley`) ops are compute-bound and are listed for reference.
As issue 15 allows, `gm_sample` and `hartley` also get a row with their generator / FFT counted
separately. `gm_sample` is its draws (`gm.gm_sample_draws`: the Gumbel argmax of `categorical` and
the normal noise; the `generator` row) followed by `gm.gm_sample_from_draws` (one component's mean
per pixel plus s n), timed directly on those draws (the `excl. generator` row, with the bytes it
reads and writes). The FFT alone (`jnp.fft.fft2` of the same input) is timed as its own row, and the
`hartley excl. FFT` row reports the difference of the medians, with the op's own bytes moved. Under the table two lines give issue 15's
check: how many rows reach 30% of the copy reference and of main-memory bandwidth, and which do not
(the generator / FFT-inclusive rows and the compute-bound KR map are left out: `OUTSIDE_TARGET`).
The ops that run a native CPU kernel (`gmflow_jax.cpu_kernels`, `KERNEL_OPS`) are also timed in their
XLA forms (`cpu_kernels.forced(False)`), interleaved in the same rounds: the last column.

    python benchmarks/gm_ops.py            # full run (B=128, 3 rounds x 20 runs per op)
    python benchmarks/gm_ops.py --quick    # B=16, 1 round x 5 runs per op
    python benchmarks/gm_ops.py --hlo      # also print the number of fusions / ops per compiled op
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gmflow_jax import cpu_kernels, flow, transport
from gmflow_jax import gm as gmlib

F32 = 4  # bytes
MEMORY_COPY_MB = 512
"""Size of the main-memory copy reference: larger than any last-level cache it is likely to meet."""


def nbytes(*shapes: tuple[int, ...]) -> int:
    """Bytes of float32 arrays of the given shapes."""
    return sum(F32 * int(np.prod(s)) for s in shapes)


def time_fn(fn: Callable, args: tuple, runs: int) -> float:
    """Median wall time in seconds of `fn(*args)` (already compiled, warmed up)."""
    out = fn(*args)
    jax.block_until_ready(out)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hlo_summary(fn: Callable, args: tuple) -> str:
    """Number of fusions and of top-level instructions in the optimized HLO of `fn`."""
    text = fn.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    n_entry = sum(1 for line in entry.splitlines() if " = " in line)
    return f"{text.count('fusion(')} fusions, {n_entry} entry instructions"


NET_ROWS = (("hartley", "hartley FFT"),)
"""(op, its FFT row): a `op excl. ...` row reports the difference of their times. (gm_sample's
part without its generator is a function of its own, `gm.gm_sample_from_draws`, timed directly.)"""

OUTSIDE_TARGET = {
    # counted without their generator / FFT (the `excl.` rows), as issue 15 allows
    "gm_sample",
    "gm_sample generator",
    "hartley",
    "hartley FFT",
    # compute-bound (an iterative solver of erf / exp sums); its target is a speed-up, not bandwidth
    "gaussian_to_gm_samples",
}
"""Rows left out of the '>= 30% of copy bandwidth' check printed under the table."""
TARGET_FRACTION = 0.30

KERNEL_OPS = ("gm_mean", "gm_to_iso_gaussian", "gm_logprob", "gm_mul_iso_gaussian", "retarget_mean")
"""Ops with a native CPU kernel (`gmflow_jax.cpu_kernels`): also timed in their XLA forms."""


def xla_forms_twin(fn: Callable) -> Callable:
    """A fresh jit of the function `fn` jits, to be traced under `cpu_kernels.forced(False)` (jit
    caches traces by function, so the twin must not share `fn`'s)."""
    raw = fn.__wrapped__
    return jax.jit(lambda *a: raw(*a))


def build_ops(b: int, h: int, w: int, k: int, c: int, seed: int = 0):
    """The (name, jitted fn, args, bytes moved) rows of the table."""
    rng = np.random.default_rng(seed)
    gm_shape, lw_shape, ls_shape = (b, h, w, k, c), (b, h, w, k, 1), (b, 1, 1, 1, 1)
    x_shape, v_shape, pix_shape = (b, h, w, c), (b, h, w, 1), (b, h, w)
    logits = rng.normal(size=lw_shape).astype(np.float32)
    lw = logits - np.log(np.exp(logits).sum(-2, keepdims=True))
    gm = gmlib.GM(
        jnp.asarray(rng.normal(size=gm_shape), jnp.float32),
        jnp.asarray(lw, jnp.float32),
        jnp.asarray(rng.uniform(-1, 0, size=ls_shape), jnp.float32),
    )
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    y = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    var = jnp.asarray(rng.uniform(0.5, 1.5, size=(b, 1, 1, 1)), jnp.float32)
    t = jnp.asarray(rng.uniform(300, 900, size=(b,)), jnp.float32)
    t_to = t * 0.5
    gm_in = nbytes(gm_shape, lw_shape, ls_shape)
    key = jax.random.key(seed)

    ops = [
        ("gm_mean", jax.jit(gmlib.gm_mean), (gm,), gm_in + nbytes(x_shape)),
        (
            "gm_to_iso_gaussian",
            jax.jit(gmlib.gm_to_iso_gaussian),
            (gm,),
            gm_in + nbytes(x_shape, v_shape),
        ),
        ("gm_logprob", jax.jit(gmlib.gm_logprob), (gm, x), gm_in + nbytes(x_shape, pix_shape)),
        (
            "gm_mul_iso_gaussian",
            jax.jit(gmlib.gm_mul_iso_gaussian),
            (gm, x, var),
            gm_in + nbytes(x_shape, (b,)) + gm_in,
        ),
        (
            # log-weights are returned unchanged (forwarded, not copied)
            "reverse_transition_gm",
            jax.jit(flow.reverse_transition_gm),
            (gm, x, t, t_to),
            nbytes(gm_shape, ls_shape, x_shape, (b,), (b,)) + nbytes(gm_shape, ls_shape),
        ),
        (
            "retarget_mean",
            jax.jit(flow.retarget_mean),
            (gm, x, t, y, t_to),
            gm_in + nbytes(x_shape, x_shape, (b,), (b,)) + nbytes(x_shape),
        ),
        (
            # log-weights are returned unchanged (forwarded, not copied)
            "u_to_x0",
            jax.jit(flow.u_to_x0),
            (gm, x, t),
            nbytes(gm_shape, ls_shape, x_shape, (b,)) + nbytes(gm_shape, ls_shape),
        ),
        ("gm_sample", jax.jit(gmlib.gm_sample), (key, gm), gm_in + nbytes(x_shape)),
        (
            # the draws of gm_sample alone (categorical: the argmax of Gumbel noise over K, and the
            # normal noise); the int32 indices and the noise are written
            "gm_sample generator",
            jax.jit(gmlib.gm_sample_draws),
            (key, gm),
            nbytes(pix_shape, x_shape),
        ),
        (
            # the rest of gm_sample, on its draws: one component's mean per pixel plus s n
            "gm_sample excl. generator",
            jax.jit(gmlib.gm_sample_from_draws),
            (gm, *gmlib.gm_sample_draws(key, gm)),
            nbytes(gm_shape, ls_shape, pix_shape, x_shape, x_shape),
        ),
        (
            "gaussian_to_gm_samples",
            jax.jit(transport.gaussian_to_gm_samples),
            (gm, x),
            gm_in + nbytes(x_shape, x_shape),
        ),
        ("hartley", jax.jit(transport.hartley), (x,), nbytes(x_shape, x_shape)),
        (
            "hartley FFT",
            jax.jit(lambda a: jnp.fft.fft2(a, axes=(-3, -2), norm="ortho")),
            (x,),
            nbytes(x_shape) + 2 * nbytes(x_shape),  # complex64 output
        ),
    ]
    return ops, gm_in


def copy_bandwidth(n_floats: int, runs: int) -> tuple[float, float]:
    """GB/s of a jitted `x + 1` over `n_floats` float32 values (read + write): (fresh, in place).

    Fresh: the output is a new buffer each call, as for every op in the table (this is the
    reference of the percentages). In place: the input is donated and the output written over it,
    so no call allocates; it measures the read + write bandwidth alone, and reads higher because a
    fresh 16.8 MB output may be mapped anew by the allocator (page faults) on some calls.
    """
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n_floats,)), jnp.float32)
    fresh = 2 * F32 * n_floats / time_fn(jax.jit(lambda a: a + 1.0), (x,), runs) / 1e9
    return fresh, in_place_copy_bandwidth(n_floats, runs)


def in_place_copy_bandwidth(n_floats: int, runs: int) -> float:
    """GB/s of a jitted in-place (donated) `x + 1` over `n_floats` float32 values (read + write)."""
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = step(jnp.zeros((n_floats,), jnp.float32))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        x = step(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * F32 * n_floats / statistics.median(times) / 1e9


def main() -> None:
    """Parse flags, time every op, print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=16, 1 round of 5 runs per op")
    parser.add_argument("--runs", type=int, default=None, help="timed calls per op (default 20)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--hlo", action="store_true", help="print fusion counts of each op")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 20)
    b = args.batch or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    h = w = 32
    k, c = 8, 4

    ops, _ = build_ops(b, h, w, k, c)
    n_copy = b * h * w * k * c
    # the machine may be shared: time everything in `rounds` interleaved rounds and keep, per op,
    # the best round's median (the copy reference gets the same treatment)
    copy_gbs = in_place_gbs = memory_gbs = 0.0
    best = {name: float("inf") for name, *_ in ops}
    twins = {name: xla_forms_twin(fn) for name, fn, *_ in ops if name in KERNEL_OPS}
    best_xla = {name: float("inf") for name in twins}
    kernels = cpu_kernels.available() and gmlib.native_kernels_apply(ops[0][2][0].means)
    for r in range(rounds):
        fresh, in_place = copy_bandwidth(n_copy, runs)
        copy_gbs, in_place_gbs = max(copy_gbs, fresh), max(in_place_gbs, in_place)
        memory_gbs = max(memory_gbs, in_place_copy_bandwidth(MEMORY_COPY_MB << 18, 5))
        for name, fn, fargs, _moved in ops:
            if r == 0 or best[name] < 0.5:  # ops slower than 0.5 s are timed in one round only
                best[name] = min(best[name], time_fn(fn, fargs, runs))
            if name in twins and kernels:
                with cpu_kernels.forced(False):
                    best_xla[name] = min(best_xla[name], time_fn(twins[name], fargs, runs))
    rows = [(name, best[name], moved) for name, _fn, _args, moved in ops]
    moved_of = {name: moved for name, _fn, _args, moved in ops}
    for op, part in NET_ROWS:
        if op in best and part in best:
            suffix = "generator" if "generator" in part else "FFT"
            # a difference under 5% of the op is timing noise, not a rate: no GB/s for it
            net = best[op] - best[part]
            rows.append(
                (f"{op} excl. {suffix}", net if net > 0.05 * best[op] else None, moved_of[op])
            )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; B={b}, H=W={h}, C={c}, K={k}; "
        f"best of {rounds} rounds of the median of {runs} runs; copy bandwidth (jitted x + 1 over "
        f"{n_copy * F32 / 1e6:.1f} MB, read + write) = {copy_gbs:.2f} GB/s with a fresh output "
        f"(the reference of '% of copy BW'), {in_place_gbs:.2f} GB/s in place (donated); "
        f"main memory (in place over {MEMORY_COPY_MB} MB) {memory_gbs:.2f} GB/s; native CPU "
        f"kernels {'on' if kernels else 'off: ' + cpu_kernels.unavailable_reason()}\n"
    )
    print(
        "| op | median ms | MB moved | GB/s | % of copy BW | % of in-place copy BW "
        "| % of memory BW | XLA forms ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, sec, moved in rows:
        xla = f"{best_xla[name] * 1e3:.2f}" if best_xla.get(name, float("inf")) < 1e9 else "-"
        if sec is None:
            print(f"| {name} | < 5% of the op (noise) | {moved / 1e6:.1f} | - | - | - | - | - |")
            continue
        gbs = moved / sec / 1e9
        print(
            f"| {name} | {sec * 1e3:.2f} | {moved / 1e6:.1f} | {gbs:.2f} | "
            f"{100 * gbs / copy_gbs:.0f}% | {100 * gbs / in_place_gbs:.0f}% | "
            f"{100 * gbs / memory_gbs:.0f}% | {xla} |"
        )
    # an `excl.` row under 5% of its op (no time of its own to speak of) counts as at speed
    checked = [
        (name, float("inf") if sec is None else moved / sec / 1e9)
        for name, sec, moved in rows
        if name not in OUTSIDE_TARGET
    ]
    for label, ref in (("copy", copy_gbs), ("main-memory", memory_gbs)):
        below = [name for name, gbs in checked if gbs < TARGET_FRACTION * ref]
        print(
            f"\nops at >= {TARGET_FRACTION:.0%} of {label} bandwidth: "
            f"{len(checked) - len(below)} of {len(checked)}"
            + (f"; below: {', '.join(below)}" if below else "")
        )
    if args.hlo:
        print()
        for name, fn, fargs, _ in ops:
            print(f"{name}: {hlo_summary(fn, fargs)}")


if __name__ == "__main__":
    main()

"""GM-DiT train-step times on this machine, and the share of the GM head, loss and solver math.

For each model (default GM-DiT-S/2 and B/2 on 32x32x4 latents) and head (K = 8 GMFlow with a
SpectrumMLP; K = 1 mean-only baseline) the script times, with the median of `--steps` calls after a
warm-up call (each `block_until_ready`):

==================  ================================================================================
column              what is timed
==================  ================================================================================
`step`              the real jitted train step (`train.state.make_train_step`): label dropout,
                    transition pair, network forward + backward, transition GM-NLL (+ spectral loss
                    with KR transport and Hartley transform for K = 8) or flow-matching L2, AdamW, EMA
`trivial`           the same step with the loss replaced by a trivial function of the network output
                    of the same shape (mean of squares of every output leaf): network forward +
                    backward, AdamW and EMA only
`loss share`        (step - trivial) / step: the GM / flow loss math (§3.3, §4.1-4.3) incl. its
                    backward, the part GMFlow adds to a plain network step
`sample`            one jitted guided sampler call (GM-SDE 2 with spectral sampling for K = 8, Euler
                    with CFG for K = 1) of `--nfe` steps on a batch of `--batch`
`forward`           `--nfe` network forwards on the doubled (guided) batch, in one jitted scan
`solver share`      (sample - forward) / sample: guidance, GM algebra, 2nd order, KR sampling
==================  ================================================================================

Each pair (step / trivial, sample / forward) is timed interleaved (a, b, a, b, ...), so that both
medians see the same machine load. The GM head itself (the log-softmax of the weights, the log-std MLP) runs in both `step` and
`trivial`; it is part of the network. Compute is float32 (bf16 is not faster on CPU); the
`--dtype` flag switches it.

    python benchmarks/train_step.py                    # S/2 and B/2, batch 8
    python benchmarks/train_step.py --models S/2 --batch 16 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.models.gm_dit import gm_dit_config
from gmflow_jax.models.image_denoiser import ImageDenoiser, SpectrumConfig, image_seams
from gmflow_jax.train.ema import EMAConfig, ema_beta, ema_update
from gmflow_jax.train.optimizer import OptimizerConfig, apply_gradients, make_adamw
from gmflow_jax.train.state import LossConfig, init_train_state, make_train_step

NUM_CLASSES = 1000
"""ImageNet classes (label table 1001 rows)."""


def time_pair(a: Callable[[], Any], b: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median seconds of `a()` and of `b()`, calls interleaved a, b, a, b, ... after a warm-up each.

    Interleaving makes the two medians see the same machine load (the ratio is what matters).
    """
    jax.block_until_ready(a())
    jax.block_until_ready(b())
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for fn, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def trivial_step(denoiser, tx, opt_cfg: OptimizerConfig, ema_cfg: EMAConfig):
    """A train step whose loss is the mean of squares of the network output (same shapes)."""

    def loss(params, batch):
        b = batch["x0"].shape[0]
        out = denoiser(params, batch["x0"], jnp.full((b,), 500.0), batch["labels"])
        return sum(jnp.mean(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(out))

    def step(state, batch):
        grads = jax.grad(loss)(state.params, batch)
        params, opt_state, metrics = apply_gradients(
            opt_cfg, tx, state.params, grads, state.opt_state, state.step
        )
        ema = ema_update(state.ema_params, params, ema_beta(ema_cfg, state.step))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new, metrics

    return jax.jit(step, donate_argnums=0)


def measure(name: str, k: int, batch: int, steps: int, nfe: int, dtype: str) -> dict[str, Any]:
    """Times of one model / head (see the module docstring)."""
    mean_only = k == 1
    cfg = gm_dit_config(
        name,
        sample_size=32,
        in_channels=4,
        num_gaussians=k,
        mean_only=mean_only,
        num_classes=NUM_CLASSES,
        dtype=dtype,
    )
    spec = None if mean_only else SpectrumConfig((4, 32, 32), (64, 8))
    model = ImageDenoiser(cfg, spec, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    denoiser, spectrum = image_seams(model)
    opt_cfg = OptimizerConfig(
        lr=2e-4,
        b2=0.95,
        weight_decay=0.05,
        warmup_iters=1000,
        grad_clip_norm=10.0,
        clip_begin=1000,
        skip_nonfinite=True,
    )
    ema_cfg = EMAConfig(policy="rampup", batch_size=batch)
    loss_cfg = LossConfig(
        objective="flow_matching_l2" if mean_only else "transition_nll",
        trans_ratio=0.5,
        weight_scale=2.0,
        t_sampler="logit_normal",
        prob_class=0.9,
        null_label=NUM_CLASSES,
    )
    tx = make_adamw(opt_cfg)
    key = jax.random.PRNGKey(0)
    data = {
        "x0": jax.random.normal(key, (batch, 32, 32, 4)),
        "labels": jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES,
    }
    row: dict[str, Any] = {"model": name, "K": k, "params": n_params}
    calls = []
    for fn in (
        make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum),
        trivial_step(denoiser, tx, opt_cfg, ema_cfg),
    ):
        state = init_train_state(model, tx, key)[1]
        holder = {"state": jax.tree.map(jnp.copy, state)}  # the step donates its input

        def call(fn=fn, holder=holder):
            holder["state"], metrics = fn(holder["state"], data)
            return metrics

        calls.append(call)
    row["step"], row["trivial"] = time_pair(calls[0], calls[1], steps)
    row["loss_share"] = (row["step"] - row["trivial"]) / row["step"]

    params = nnx.state(model)
    if mean_only:
        scfg = solvers.SolverConfig(
            solver="euler",
            num_steps=nfe,
            guidance="cfg",
            guidance_scale=2.0,
            null_label=NUM_CLASSES,
        )
    else:
        scfg = solvers.SolverConfig(
            solver="gm_sde",
            order=2,
            num_steps=nfe,
            guidance_scale=0.3,
            null_label=NUM_CLASSES,
            spectral=True,
        )
    noise = data["x0"]

    @jax.jit
    def forwards(params, x, labels):
        def body(carry, t):
            out = denoiser(params, carry, jnp.full((x.shape[0],), t), labels)
            leaf = jax.tree.leaves(out)[0]
            return carry + 1e-6 * jnp.mean(leaf), None

        return jax.lax.scan(body, x, jnp.linspace(1000.0, 100.0, nfe))[0]

    doubled = jnp.concatenate([noise, noise])
    labels2 = jnp.concatenate([jnp.full((batch,), NUM_CLASSES, jnp.int32), data["labels"]])
    row["sample"], row["forward"] = time_pair(
        lambda: solvers.sample(
            denoiser,
            params,
            key,
            noise,
            data["labels"],
            scfg,
            jnp.float32(scfg.guidance_scale),
            spectrum if scfg.spectral else None,
        ),
        lambda: forwards(params, doubled, labels2),
        steps,
    )
    row["solver_share"] = (row["sample"] - row["forward"]) / row["sample"]
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="S/2,B/2", help="comma-separated DiT sizes")
    parser.add_argument("--batch", type=int, default=8, help="latents per train step / sample")
    parser.add_argument("--steps", type=int, default=3, help="timed calls (after one warm-up)")
    parser.add_argument("--nfe", type=int, default=8, help="sampler steps")
    parser.add_argument("--dtype", default="float32", help="compute dtype (params stay fp32)")
    args = parser.parse_args(argv)
    rows = []
    header = (
        f"{'model':<8}{'K':>3}{'params':>12}{'step s':>9}{'trivial s':>11}{'loss %':>8}"
        f"{'sample s':>10}{'forward s':>11}{'solver %':>10}"
    )
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, 32x32x4, {args.dtype}")
    print(header, flush=True)
    for name in args.models.split(","):
        for k in (8, 1):
            r = measure(name, k, args.batch, args.steps, args.nfe, args.dtype)
            rows.append(r)
            print(
                f"{r['model']:<8}{r['K']:>3}{r['params']:>12,}{r['step']:>9.2f}{r['trivial']:>11.2f}"
                f"{100 * r['loss_share']:>7.1f}%{r['sample']:>10.2f}{r['forward']:>11.2f}"
                f"{100 * r['solver_share']:>9.1f}%",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

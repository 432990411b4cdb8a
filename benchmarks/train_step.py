"""GM-DiT train-step and sampler times on this machine, and the share of the GM head, loss and solver math.

For each model (default GM-DiT-S/2 and B/2 on 32x32x4 latents) and head (K = 8 GMFlow with a
SpectrumMLP; K = 1 mean-only baseline) the script times (median of `--steps` calls after a warm-up
call, each `block_until_ready`):

==============  ====================================================================================
column          what is timed
==============  ====================================================================================
`step`          the real train step (`train.step.make_train_step`, jitted, donating): label dropout,
                transition pair, network forward + backward, transition GM-NLL (+ spectral loss with
                KR transport, Hartley transform and the SpectrumMLP for K = 8) or flow-matching L2,
                AdamW, EMA
`trivial`       the same step with the loss replaced by the mean of squares of every output leaf
                (network forward + backward, AdamW, EMA); timed interleaved with `step`
`head`          forward + backward of `GMDiT.head` alone on the trunk's token states: the final
                adaLN layer, the K(C+1)-channel projection, unpatchify, log-softmax of the weights and
                the log-std MLP (the mean-velocity projection for K = 1)
`loss`          forward + backward of the loss alone (`train.state.loss_terms` on a network whose
                output is a fixed GM): everything the loss adds to the step
`sample`        one jitted guided sampler call of `--nfe` steps on a batch of `--batch` (GM-SDE 2
                with spectral sampling for K = 8, Euler with CFG for K = 1)
`solver`        the same sampler call with a network whose output is a fixed GM: guidance, GM
                algebra, the 2nd-order correction, KR spectral sampling
==============  ====================================================================================

Shares: `head+loss %` = (head + loss) / step, the part of a train step that is GMFlow's (the issue's
target is <= 5% at B/2); `solver %` = solver / sample. `head`, `loss` and `solver` are small
functions timed directly (median of 20 calls), because the difference of two large, noisy timings
(`step - trivial`, whose noise is a few percent of `step` on this machine) cannot resolve a few
percent; `step - trivial` is printed as a cross-check (`diff %`). Compute is float32 (bf16 is not
faster on CPU); `--dtype` switches it.

    python benchmarks/train_step.py                    # S/2 and B/2, batch 8
    python benchmarks/train_step.py --models S/2 --batch 16 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.gm import GM
from gmflow_jax.models.builder import build_image_denoiser
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.models.gm_dit import gm_dit_config
from gmflow_jax.models.image_denoiser import SPECTRUM_NET, ImageDenoiser, SpectrumConfig
from gmflow_jax.train.ema import EMAConfig, ema_beta, ema_update
from gmflow_jax.train.optimizer import OptimizerConfig, apply_gradients, make_adamw
from gmflow_jax.train.state import LossConfig, init_train_state, loss_terms
from gmflow_jax.train.step import make_train_step

Array = jax.Array

NUM_CLASSES = 1000
"""ImageNet classes (label table 1001 rows)."""

SMALL_REPS = 20
"""Timed calls of the small, directly timed functions (head, loss, solver)."""

HEAD_LAYERS = ("final_modulation", "final_proj", "logstd_hidden", "logstd_out")
"""The `GMDiT` attributes that `GMDiT.head` uses (the trunk is everything else)."""


def time_calls(fns: Sequence[Callable[[], Any]], runs: int) -> list[float]:
    """Median seconds of each `fns[i]()`, calls interleaved f0, f1, ..., f0, f1, ... after a warm-up.

    Interleaving makes the medians see the same machine load (the ratios are what matter).
    """
    for fn in fns:
        jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def mean_square(out: Any) -> Array:
    """The trivial loss: the sum over output leaves of the mean of squares (float32)."""
    return sum(jnp.mean(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(out))


def trivial_step(denoiser, tx, opt_cfg: OptimizerConfig, ema_cfg: EMAConfig):
    """A train step whose loss is the mean of squares of the network output (same shapes)."""

    def loss(params, batch):
        b = batch["x0"].shape[0]
        return mean_square(denoiser(params, batch["x0"], jnp.full((b,), 500.0), batch["labels"]))

    def step(state, batch):
        grads = jax.grad(loss)(state.params, batch)
        params, opt_state, metrics = apply_gradients(
            opt_cfg, tx, state.params, grads, state.opt_state, state.step
        )
        ema = ema_update(state.ema_params, params, ema_beta(ema_cfg, state.step))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new, metrics

    return jax.jit(step, donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class FixedOutput:
    """A zero-cost stand-in network: returns `params["out"]` (batch 1) broadcast to x's batch.

    The output moves with x (`+ 1e-3 x` on the means) so that the solver's arithmetic cannot be
    hoisted out of its scan; the cost of that one multiply-add is part of the timed math.
    """

    mean_only: bool

    def __call__(self, params: Any, x: Array, t: Array, labels: Array | None = None) -> Any:
        """The fixed output at x `[B, H, W, C]` (t and labels are ignored)."""
        out, b = params["out"], x.shape[0]
        if self.mean_only:
            return out + 1e-3 * x
        return GM(
            means=out.means + 1e-3 * x[..., None, :],
            logweights=jnp.broadcast_to(out.logweights, (b, *out.logweights.shape[1:])),
            logstds=jnp.broadcast_to(out.logstds, (b, *out.logstds.shape[1:])),
        )


def head_call(model: ImageDenoiser, batch: int) -> Callable[[], Any]:
    """Forward + backward of `GMDiT.head` alone (w.r.t. its parameters and the token states)."""
    cfg = model.config
    graphdef, head_params, trunk_params = nnx.split(
        model.denoiser,
        lambda path, value: bool(path) and path[0] in HEAD_LAYERS,
        ...,
    )
    key_h, key_c = jax.random.split(jax.random.PRNGKey(1))
    h = jax.random.normal(key_h, (batch, cfg.grid_size**2, cfg.hidden_size))
    c = jax.random.normal(key_c, (batch, cfg.hidden_size))

    @jax.jit
    def fwd_bwd(head_params, trunk_params, h, c):
        def loss(head_params, h, c):
            return mean_square(nnx.merge(graphdef, head_params, trunk_params).head(h, c))

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(head_params, h, c)

    return lambda: fwd_bwd(head_params, trunk_params, h, c)


def fixed_params(model: ImageDenoiser, key: Array) -> dict[str, Any]:
    """`{"out": a fixed network output of batch 1, "spectrum_net": ...}` for `FixedOutput`."""
    cfg = model.config
    shape = (1, cfg.sample_size, cfg.sample_size)
    if cfg.mean_only:
        return {"out": jax.random.normal(key, (*shape, cfg.in_channels))}
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k2, (*shape, cfg.num_gaussians, 1))
    out = GM(
        means=jax.random.normal(k1, (*shape, cfg.num_gaussians, cfg.in_channels)),
        logweights=jax.nn.log_softmax(logits, axis=-2),
        logstds=jnp.full((1, 1, 1, 1, 1), -1.0),
    )
    return {"out": out, SPECTRUM_NET: nnx.state(model)[SPECTRUM_NET]}


def loss_call(
    model: ImageDenoiser, spectrum, loss_cfg: LossConfig, data: dict[str, Array], key: Array
) -> Callable[[], Any]:
    """Forward + backward of the loss alone (`loss_terms` on a `FixedOutput` network)."""
    fixed = FixedOutput(model.config.mean_only)
    params = fixed_params(model, key)

    @jax.jit
    def fwd_bwd(params, key, x0, labels):
        def loss(params):
            terms = loss_terms(fixed, params, key, x0, labels, loss_cfg, spectrum)
            return sum(terms.values())

        return jax.value_and_grad(loss)(params)

    return lambda: fwd_bwd(params, key, data["x0"], data["labels"])


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
    model = build_image_denoiser(cfg, spec, jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    denoiser, spectrum = network_functions(model)
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
        jax.jit(
            make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum), donate_argnums=0
        ),
        trivial_step(denoiser, tx, opt_cfg, ema_cfg),
    ):
        state = init_train_state(model, tx, key)[1]
        holder = {"state": jax.tree.map(jnp.copy, state)}  # the step donates its input

        def call(fn=fn, holder=holder):
            holder["state"], metrics = fn(holder["state"], data)
            return metrics

        calls.append(call)
    row["step"], row["trivial"] = time_calls(calls, steps)
    del calls
    row["head"], row["loss"] = time_calls(
        [head_call(model, batch), loss_call(model, spectrum, loss_cfg, data, key)], SMALL_REPS
    )
    row["head_loss_share"] = (row["head"] + row["loss"]) / row["step"]
    row["diff_share"] = (row["step"] - row["trivial"]) / row["step"]

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
    spectrum = spectrum if scfg.spectral else None
    w = jnp.float32(scfg.guidance_scale)
    params = nnx.state(model)
    (row["sample"],) = time_calls(
        [
            lambda: solvers.sample(
                denoiser, params, key, data["x0"], data["labels"], scfg, w, spectrum
            )
        ],
        steps,
    )
    fixed, free = FixedOutput(mean_only), fixed_params(model, key)
    (row["solver"],) = time_calls(
        [lambda: solvers.sample(fixed, free, key, data["x0"], data["labels"], scfg, w, spectrum)],
        SMALL_REPS,
    )
    row["solver_share"] = row["solver"] / row["sample"]
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
        f"{'model':<6}{'K':>3}{'params':>13}{'step s':>8}{'trivial s':>10}{'diff %':>8}"
        f"{'head ms':>9}{'loss ms':>9}{'head+loss %':>12}{'sample s':>10}{'solver ms':>11}"
        f"{'solver %':>10}"
    )
    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}, 32x32x4, {args.dtype}")
    print(header, flush=True)
    for name in args.models.split(","):
        for k in (8, 1):
            r = measure(name, k, args.batch, args.steps, args.nfe, args.dtype)
            rows.append(r)
            print(
                f"{r['model']:<6}{r['K']:>3}{r['params']:>13,}{r['step']:>8.2f}{r['trivial']:>10.2f}"
                f"{100 * r['diff_share']:>7.1f}%{1e3 * r['head']:>9.1f}{1e3 * r['loss']:>9.1f}"
                f"{100 * r['head_loss_share']:>11.2f}%{r['sample']:>10.2f}{1e3 * r['solver']:>11.1f}"
                f"{100 * r['solver_share']:>9.2f}%",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

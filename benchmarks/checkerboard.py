"""Checkerboard benchmark: GMFlow (K=64) vs the flow-matching baseline at the same budget, plus speed.

    python benchmarks/checkerboard.py --workdir=runs/bench_checkerboard            # default budget
    python benchmarks/checkerboard.py --workdir=runs/bench_full --budget=full       # paper: 200k its

Trains (or reuses, when a run's `metrics.json` exists) GMFlow and the baseline with
`train_and_evaluate` on `configs/checkerboard.py` (variants "" / "baseline", or "full" / "full_baseline"),
then prints:

1. the metric table (solver x NFE) of both models, with the exact-sample floor, and the issue's
   acceptance comparisons (GM-SDE 2 at NFE 4 vs every baseline at NFE 8; at NFE 1 vs NFE 4);
2. speed, measured in this run: the fp32 matmul peak (4096^2 `jnp.dot`), the K=64 and K=1 train steps
   at batch 4096 through the mesh loop (`train.step.jit_train_step` fed by the task's batches) as a
   fraction of that peak (analytic MLP FLOPs: 3x the forward), next to the old plain `jax.jit` of the
   same step (all four steps timed in alternating blocks), the K=64 / K=1 step ratio and the share
   of the K=64 step in the GM head and loss (each one's forward + backward alone, minus the mean
   head's and the L2 loss's), sampling points/s per solver at NFE 8, and the share of sampling
   time spent outside the network forward (the solver math).

Timings need an idle machine: JAX drops to about one core under load from another process.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.data.checkerboard import checkerboard_batch
from gmflow_jax.gm import GM
from gmflow_jax.losses import flow_matching_l2_loss, transition_nll_loss
from gmflow_jax.models.builder import build_model
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.parallel.sharding import process_rows
from gmflow_jax.run import train_and_evaluate
from gmflow_jax.tasks.checkerboard import CheckerboardTask
from gmflow_jax.train.loop import run_mesh
from gmflow_jax.train.optimizer import make_adamw
from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step, step_settings
from gmflow_jax.train.task import BatchLayout, run_keys

_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "checkerboard.py"
)
_spec = importlib.util.spec_from_file_location("checkerboard_config", _CONFIG)
cb_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cb_config)


def _median_time(fn, runs: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_gflops(n: int = 4096, runs: int = 10) -> float:
    """fp32 matmul throughput of this machine, GFLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    return 2 * n**3 / _median_time(lambda: f(a, b), runs) / 1e9


def mlp_forward_flops(cfg) -> int:
    """Analytic multiply-add FLOPs (x2) of one toy-MLP forward per sample (§6.4)."""
    m = cfg.model
    width_in = 2 * m.embed_dim
    flops = width_in * m.hidden_dim + (m.num_layers - 1) * m.hidden_dim**2
    heads = 2 if m.mean_only else 2 * m.num_gaussians + m.num_gaussians + 1
    return 2 * (flops + m.hidden_dim * heads)


def _step_paths(config, batch_size: int):
    """(old, new) zero-argument step runners on the same start state and data stream.

    old: what the plain single-device loop ran before the one-path change: `jax.jit` of the pure
    step with the state donated, batch s from a jitted `checkerboard_batch`. new: what every run
    executes now: `jit_train_step` (shardings on the default mesh, the state donated) fed by the
    checkerboard task's batch iterator (made on the devices in the batch sharding).
    """
    config = copy.deepcopy(config)
    config.train.batch_size = batch_size
    keys = run_keys(0)
    opt_cfg, ema_cfg, loss_cfg = step_settings(config)
    tx = make_adamw(opt_cfg)
    mesh = run_mesh(config)

    def model_fn():
        return build_model(config.model, keys["init"])

    _, init, shardings = init_on_mesh(model_fn, tx, keys["train"], mesh)
    denoiser, _ = network_functions(nnx.eval_shape(model_fn))
    pure = make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg)
    old_step = jax.jit(pure, donate_argnums=0)
    old_batch = jax.jit(checkerboard_batch, static_argnums=2)
    new_step = jit_train_step(pure, mesh, shardings)
    task = CheckerboardTask(config, keys)
    batches = task.batches(0, BatchLayout(mesh, batch_size, process_rows(mesh, batch_size)))
    holders = {"old": {"state": init(), "i": 0}, "new": {"state": init()}}

    def old():
        h = holders["old"]
        h["state"], metrics = old_step(
            h["state"], {"x0": old_batch(keys["data"], jnp.int32(h["i"]), batch_size)}
        )
        h["i"] += 1
        return metrics["loss"]

    def new():
        h = holders["new"]
        h["state"], metrics = new_step(h["state"], next(batches))
        return metrics["loss"]

    return old, new


def loop_step_speeds(configs: dict, batch_size: int, runs: int, steps: int = 10) -> dict:
    """Per config: median per-step time of the old plain step and of the mesh loop's step.

    Every runner (old and new, for every config) is timed in blocks of `steps` steps, the blocks
    alternating over all runners round by round, so that the K=64 / K=1 ratio compares steps
    that saw the same machine state (a shared machine's speed drifts by several percent between
    consecutive minutes).
    """
    runners = {}
    for name, config in configs.items():
        runners[name, "old"], runners[name, "new"] = _step_paths(config, batch_size)
    times = {key: [] for key in runners}
    for fn in runners.values():
        jax.block_until_ready(fn())  # compile
    for _ in range(runs):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - t0) / steps)
    result = {}
    for name, config in configs.items():
        old_s, new_s = statistics.median(times[name, "old"]), statistics.median(times[name, "new"])
        result[name] = {
            "old_ms": 1e3 * old_s,
            "step_ms": 1e3 * new_s,
            "ratio": new_s / old_s,
            "gflops": 3 * mlp_forward_flops(config) * batch_size / new_s / 1e9,
        }
    return result


def gm_loss_ms(batch_size: int, num_gaussians: int, runs: int) -> dict:
    """Forward + backward ms of the transition GM-NLL (K components) and of the L2 loss alone.

    Both on fixed network outputs at the checkerboard layout (x [B, 1, 1, 2]), so that the
    difference is the GM loss's own cost in a train step (the GM head's projection is counted in the
    analytic MLP FLOPs). Timed in alternating blocks.
    """
    keys = jax.random.split(jax.random.PRNGKey(7), 6)
    b, k, c = batch_size, num_gaussians, 2
    means = jax.random.normal(keys[0], (b, 1, 1, k, c))
    logits = jax.random.normal(keys[1], (b, 1, 1, k, 1))
    logstds = jnp.full((b, 1, 1, 1, 1), -1.0)
    x_high, x_low = (jax.random.normal(kk, (b, 1, 1, c)) for kk in keys[2:4])
    t_high = jax.random.uniform(keys[4], (b,), minval=1.0, maxval=1000.0)
    t_low = 0.8 * t_high

    def gm_loss(m, lg, ls):
        gm_u = GM(m, jax.nn.log_softmax(lg, axis=-2), ls)
        return transition_nll_loss(gm_u, x_high, t_high, x_low, t_low)[0]

    def l2_loss(u):
        return flow_matching_l2_loss(u, x_low, x_high, t_high)[0]

    gm_fn = jax.jit(jax.value_and_grad(gm_loss, argnums=(0, 1, 2)))
    l2_fn = jax.jit(jax.value_and_grad(l2_loss))
    u = means[..., 0, :]
    times = {"gm": [], "l2": []}
    for _ in range(runs):
        times["gm"].append(_median_time(lambda: gm_fn(means, logits, logstds), 5))
        times["l2"].append(_median_time(lambda: l2_fn(u), 5))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def head_ms(config, batch_size: int, runs: int) -> float:
    """Forward + backward ms of the model's output head alone (`ToyMLP.head`) on fixed features.

    The gradient is taken with respect to the head's parameters and its input features (what the
    train step's backward computes there); for the GM model the head includes the log-softmax of
    the log-weights.
    """
    model = build_model(config.model, run_keys(config.seed)["init"])
    graphdef, params = nnx.split(model)
    h = jax.random.normal(jax.random.PRNGKey(5), (batch_size, config.model.hidden_dim))

    def loss(p, feats):
        out = nnx.merge(graphdef, p).head(feats)
        leaves = jax.tree.leaves(out)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in leaves)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return 1e3 * statistics.median(_median_time(lambda: fn(params, h), 5) for _ in range(runs))


def sampling_speed(config, ema_params, graphdef, num_points: int, runs: int) -> list[dict]:
    """Points/s per solver at NFE 8 and the share of time outside the network forward."""
    denoiser, _ = network_functions(nnx.merge(graphdef, ema_params))
    noise = jax.random.normal(jax.random.PRNGKey(3), (num_points, 1, 1, 2))
    t = jnp.full((num_points,), 500.0)
    fwd = jax.jit(lambda p, x: denoiser(p, x, t, None), static_argnums=())
    forward = _median_time(lambda: fwd(ema_params, noise), runs)
    out = []
    if config.model.mean_only:
        cfgs = [solvers.SolverConfig(s, 8) for s in config.sample.baseline_solvers]
    else:
        cfgs = [
            solvers.SolverConfig("gm_sde", 8, order=1),
            solvers.SolverConfig("gm_sde", 8, order=2),
            solvers.SolverConfig("gm_ode", 8, solvers.default_substeps(8), order=1),
            solvers.SolverConfig("gm_ode", 8, solvers.default_substeps(8), order=2),
        ]
    for cfg in cfgs:
        seconds = _median_time(
            lambda cfg=cfg: solvers.sample(
                denoiser, ema_params, jax.random.PRNGKey(0), noise, None, cfg
            ),
            runs,
        )
        name = cfg.solver + (" 2" if cfg.order == 2 else "")
        if cfg.num_substeps > 1:
            name += f" (S={cfg.num_substeps})"
        out.append(
            {
                "solver": name,
                "points_per_s": num_points / seconds,
                "solver_math_share": max(0.0, 1.0 - cfg.num_steps * forward / seconds),
            }
        )
    return out


def run_or_load(variant: str, workdir: str) -> dict:
    """Train and evaluate `configs/checkerboard.py:variant` in `workdir`, or load its metrics.json."""
    config = cb_config.get_config(variant)
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        train_and_evaluate(config, workdir)
    with open(path) as f:
        return json.load(f)


def _by_key(payload: dict) -> dict:
    return {(r["row"], r["nfe"]): r["metrics"] for r in payload["results"]}


def acceptance(gm: dict, base: dict) -> list[str]:
    """The issue's comparisons: GM-SDE 2 at NFE 4 (1) vs every baseline at NFE 8 (4)."""
    g, b = _by_key(gm), _by_key(base)
    lines = []
    for gm_nfe, base_nfe in ((4, 8), (1, 4)):
        ours = g[("gm_sde_2", gm_nfe)]
        for row in sorted({r for r, _ in b}):
            theirs = b[(row, base_nfe)]
            tv = ours["histogram_tv"] < theirs["histogram_tv"]
            sq = ours["in_square_rate"] > theirs["in_square_rate"]
            lines.append(
                f"GM-SDE 2 @ NFE {gm_nfe} vs {row} @ NFE {base_nfe}: "
                f"TV {ours['histogram_tv']:.4f} vs {theirs['histogram_tv']:.4f} "
                f"({'better' if tv else 'WORSE'}), in-square {ours['in_square_rate']:.4f} vs "
                f"{theirs['in_square_rate']:.4f} ({'better' if sq else 'WORSE'})"
            )
    return lines


def metric_table(payload: dict) -> str:
    """Markdown table of one model's results."""
    lines = [
        "| solver | NFE | in-square | hist TV | sliced W1 | coverage |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        m = r["metrics"]
        lines.append(
            f"| {r['row']} | {r['nfe']} | {m['in_square_rate']:.4f} | {m['histogram_tv']:.4f} | "
            f"{m['sliced_w1']:.4f} | {m['coverage']:.3f} |"
        )
    f = payload["exact_sample_floor"]
    lines.append(
        f"| exact sample | - | {f['in_square_rate']:.4f} | {f['histogram_tv']:.4f} | "
        f"{f['sliced_w1']:.4f} | {f['coverage']:.3f} |"
    )
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/bench_checkerboard")
    parser.add_argument("--budget", choices=("default", "full"), default="default")
    parser.add_argument("--skip_quality", action="store_true", help="speed tables only")
    parser.add_argument("--runs", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args()
    prefix = "" if args.budget == "default" else "full"
    gm_variant, base_variant = prefix, (prefix + "_baseline").strip("_")

    if not args.skip_quality:
        gm = run_or_load(gm_variant, os.path.join(args.workdir, "gmflow"))
        base = run_or_load(base_variant, os.path.join(args.workdir, "baseline"))
        print("\n## GMFlow (K=64)\n" + metric_table(gm))
        print("\n## Flow-matching baseline\n" + metric_table(base))
        print(
            f"\ntrain steps: GMFlow {gm['train']['steps']}, baseline {base['train']['steps']}; "
            f"train it/s (as run): GMFlow {gm['train']['it_per_s']:.2f}, "
            f"baseline {base['train']['it_per_s']:.2f}"
        )
        print("\n## Acceptance comparisons\n" + "\n".join(acceptance(gm, base)))

    print("\n## Speed (this run)")
    peak = matmul_peak_gflops(runs=args.runs)
    print(f"fp32 matmul peak (4096^2 jnp.dot): {peak:.1f} GFLOP/s")
    steps = {}
    configs = {v: cb_config.get_config(v) for v in ("full", "full_baseline")}
    speeds = loop_step_speeds(configs, 4096, args.runs)
    for variant, cfg in configs.items():
        speed = speeds[variant]
        steps[variant] = speed["step_ms"]
        print(
            f"train step, batch 4096, {'baseline K=1' if cfg.model.mean_only else 'GMFlow K=64'}: "
            f"{speed['step_ms']:.1f} ms through the mesh loop, {speed['gflops']:.1f} GFLOP/s = "
            f"{100 * speed['gflops'] / peak:.0f}% of peak; old plain jit {speed['old_ms']:.1f} ms "
            f"(mesh / plain = {speed['ratio']:.3f})"
        )
    loss = gm_loss_ms(4096, cb_config.get_config("full").model.num_gaussians, args.runs)
    heads = {
        v: head_ms(cb_config.get_config(v), 4096, args.runs) for v in ("full", "full_baseline")
    }
    gm_part = heads["full"] - heads["full_baseline"] + loss["gm"] - loss["l2"]
    print(
        f"K=64 step / K=1 step = {steps['full'] / steps['full_baseline']:.3f} (target <= 1.10)\n"
        f"GM head fwd+bwd alone {heads['full']:.2f} ms vs mean head {heads['full_baseline']:.2f} "
        f"ms; GM loss fwd+bwd alone {loss['gm']:.2f} ms vs L2 {loss['l2']:.2f} ms: the GM head "
        f"and loss (beyond the baseline's) are {gm_part:.1f} ms = "
        f"{100 * gm_part / steps['full']:.1f}% of the K=64 step"
    )
    for variant in ("", "baseline"):
        cfg = cb_config.get_config(variant)
        keys = run_keys(cfg.seed)
        model = build_model(cfg.model, keys["init"])
        graphdef, params = nnx.split(model)  # timing does not depend on the weights
        rows = sampling_speed(cfg, params, graphdef, 50_000, args.runs)
        print(
            f"\nsampling, 50,000 points, NFE 8 ({'baseline' if cfg.model.mean_only else 'GMFlow'}):"
        )
        print("| solver | points/s | solver math share |\n|---|---:|---:|")
        for r in rows:
            print(
                f"| {r['solver']} | {r['points_per_s']:,.0f} | {100 * r['solver_math_share']:.1f}% |"
            )


if __name__ == "__main__":
    main()

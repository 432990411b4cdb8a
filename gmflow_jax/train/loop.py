"""The main job: train with checkpoints and TensorBoard, then evaluate (any task; checkerboard here).

`train_and_evaluate(config, workdir)` first picks the task of `config.data.name`
(`gmflow_jax.tasks`: "checkerboard", "digits", "imagenet_latents"), which opens its data (a missing
data set stops the run here), builds the model and its seams, supplies the batches and evaluates. This
module holds the generic loop and the checkerboard's model, batches and evaluation
(config: `configs/checkerboard.py`):

1. **train** (spec `gmflow-math.md` §4): resume from the workdir's newest checkpoint (or start fresh),
   run the jitted train step (`train.state.make_train_step`, with the task's denoiser and optional
   spectrum seams) on the task's batch s (checkerboard: checkerboard(fold_in(data key, s))), log loss /
   lr / grad_norm / it/s to TensorBoard and a tqdm bar every `log_every` steps (the
   only host syncs), fail fast with `FloatingPointError` on a non-finite loss, and save orbax
   checkpoints every `checkpoint.every_steps` steps and at the end. When the run already finished,
   training is skipped.
2. **evaluate** (the task's; for the checkerboard §7 "Checkerboard", extended): with the EMA
   parameters, for each solver row and NFE of
   `config.sample` (GMFlow rows for a GM model, baseline rows for a mean-only model) draw
   `eval.num_samples` points in fixed-size jitted batches (the same noise for every solver), score them
   with `eval.checkerboard.checkerboard_metrics`, and write `metrics.json` (atomically), a PNG
   histogram grid (rows = solver, columns = NFE) and a printed table, with the exact-sample floor.

Random streams: from `PRNGKey(config.seed)`, independent keys for model init, training (iteration i
uses fold_in(key, i)), data and evaluation; a resumed run therefore continues bit-identically.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm import tqdm

from gmflow_jax import solvers, tasks
from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.checkpoint import Checkpointer, restore_or_init
from gmflow_jax.data.checkerboard import checkerboard_batch
from gmflow_jax.eval.checkerboard import checkerboard_metrics, exact_sample_floor
from gmflow_jax.eval.figures import histogram_grid_png
from gmflow_jax.models.toy_mlp import ToyMLP
from gmflow_jax.train.ema import EMAConfig
from gmflow_jax.train.optimizer import OptimizerConfig, make_adamw
from gmflow_jax.train.state import (
    LossConfig,
    NNXDenoiser,
    TrainState,
    init_train_state,
    make_train_step,
)

PyTree = Any

METRIC_COLUMNS = ("in_square_rate", "histogram_tv", "sliced_w1", "coverage", "nonfinite_rate")
"""Metrics shown in the printed table (all of them go to metrics.json)."""


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent keys of a run: "init", "train", "data", "eval" (raw uint32 keys)."""
    init, train, data, evaluation = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"init": init, "train": train, "data": data, "eval": evaluation}


def build_model(model_cfg: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
    """The network named by `config.model` (only the §6.4 toy MLP here)."""
    if model_cfg.name != "toy_mlp":
        raise ValueError(
            f"config.model.name must be 'toy_mlp' for this job, got {model_cfg.name!r}"
        )
    return ToyMLP(
        model_cfg.num_gaussians,
        embed_dim=model_cfg.embed_dim,
        hidden_dim=model_cfg.hidden_dim,
        num_layers=model_cfg.num_layers,
        pos_min_period=model_cfg.pos_min_period,
        pos_max_period=model_cfg.pos_max_period,
        mean_only=model_cfg.mean_only,
        rngs=nnx.Rngs(params=key),
    )


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    """`OptimizerConfig` from `config.train.optimizer`."""
    return OptimizerConfig(**config.train.optimizer.to_dict())


def ema_config(config: ml_collections.ConfigDict) -> EMAConfig:
    """`EMAConfig` from `config.train.ema`."""
    return EMAConfig(**config.train.ema.to_dict())


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    """`LossConfig` from `config.train`; the objective follows `config.model.mean_only`.

    Optional fields (class-conditional tasks): `config.train.prob_class` (label keep probability,
    default 1.0), `config.train.spectral_loss_weight` (default 1.0); the null label is
    `config.model.num_classes` when the model has classes.
    """
    t = config.train
    return LossConfig(
        objective="flow_matching_l2" if config.model.mean_only else "transition_nll",
        trans_ratio=t.trans_ratio,
        weight_scale=t.weight_scale,
        t_sampler=t.t_sampler,
        logit_normal_mean=t.logit_normal_mean,
        logit_normal_std=t.logit_normal_std,
        shift=t.shift,
        prob_class=float(t.get("prob_class", 1.0)),
        null_label=int(config.model.get("num_classes", -1)),
        spectral_weight=float(t.get("spectral_loss_weight", 1.0)),
    )


def model_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The model's graphdef, without allocating parameters."""
    abstract = nnx.eval_shape(lambda: build_model(config.model, jax.random.PRNGKey(0)))
    return nnx.split(abstract)[0]


_checkerboard_batch = jax.jit(checkerboard_batch, static_argnums=2)
"""Batch s of the run: checkerboard points [B, 1, 1, 2] from fold_in(data key, s) (jitted once)."""

checkerboard_step_batch = _checkerboard_batch
"""Public name of the jitted checkerboard batch `(data key, step, batch_size) -> [B, 1, 1, 2]`."""


def check_finite_metrics(history: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Raise FloatingPointError naming the first step whose loss or grad_norm is non-finite.

    `history` holds (0-based step, host metrics). Steps whose update was skipped (`skipped` = 1, the
    non-finite-gradient skip of §4.6) are allowed a non-finite loss and grad norm.
    """
    for step, metrics in history:
        if metrics.get("skipped", 0.0) > 0:
            continue
        for name in ("loss", "grad_norm"):
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite {name} = {value} at training step {step} (0-based) and the update "
                    "was applied; lower the learning rate, or enable optimizer.skip_nonfinite / "
                    "grad_clip_norm"
                )


TRAIN_LOG_FILE = "train_log.json"
"""Per-invocation training records (steps, wall time, it/s) kept in the workdir across resumes."""


def _read_train_log(workdir: str) -> list[dict[str, Any]]:
    """The training sessions recorded in the workdir (empty if none)."""
    path = os.path.join(workdir, TRAIN_LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["sessions"]


def train(
    config: ml_collections.ConfigDict, workdir: str, task: tasks.Task | None = None
) -> tuple[nnx.GraphDef, TrainState, dict[str, Any]]:
    """Train (or resume) in `workdir`; returns (graphdef, final state, training info).

    `task` defaults to `tasks.make_task(config)`. Info: steps, start_step, resumed (how the state was
    obtained), wall_time_s of this invocation, and when steps ran: it_per_s (steady state: the first
    logging interval, which compiles, is excluded) and final_loss. `sessions` lists every invocation
    that trained in this workdir (also kept in `train_log.json`) and `train_wall_time_s` sums their
    wall times. A config with a `mesh` section (pod scale) is trained by
    `train.sharded.train_sharded` instead (same return values, plus `preempted` and `mesh`).
    """
    task = task if task is not None else tasks.make_task(config)
    if config.get("mesh") is not None:  # pod scale: mesh, sharded state, grain data state, SIGTERM
        from gmflow_jax.train.sharded import train_sharded

        return train_sharded(config, workdir, task)
    os.makedirs(workdir, exist_ok=True)
    task.prepare_workdir(workdir)
    keys = run_keys(config.seed)
    tx = make_adamw(optimizer_config(config))
    abstract = nnx.eval_shape(lambda: task.build_model(jax.random.PRNGKey(0)))
    graphdef = nnx.split(abstract)[0]
    seams = task.seams(abstract)

    @jax.jit  # one compile instead of many eager initializer ops
    def init_fn() -> TrainState:
        return init_train_state(task.build_model(keys["init"]), tx, keys["train"])[1]

    num_steps = config.train.num_steps
    t_start = time.perf_counter()
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        save_every=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save,
    )
    info: dict[str, Any] = {"steps": num_steps}
    try:
        state, how = restore_or_init(
            ckpt, init_fn, restore_from=config.checkpoint.restore_from or None
        )
        start = int(state.step)
        print(f"train state: {how} (step {start} of {num_steps})", flush=True)
        info.update(start_step=start, resumed=how)
        if start < num_steps:
            info.update(_train_steps(config, workdir, state, task, seams, tx, ckpt, start))
            state = info.pop("state")
        ckpt.save(int(state.step), state, force=True)
    finally:
        ckpt.close()
    info["wall_time_s"] = time.perf_counter() - t_start
    sessions = _read_train_log(workdir)
    if "it_per_s" in info:
        sessions.append(
            {
                "start_step": info["start_step"],
                "end_step": num_steps,
                "wall_time_s": info["wall_time_s"],
                "it_per_s": info["it_per_s"],
                "final_loss": info["final_loss"],
            }
        )
        write_json_atomic(os.path.join(workdir, TRAIN_LOG_FILE), {"sessions": sessions})
    info["sessions"] = sessions
    info["train_wall_time_s"] = sum(r["wall_time_s"] for r in sessions)
    return graphdef, state, info


LOGGED_METRICS = ("loss", "lr", "grad_norm", "loss_trans", "loss_spec")
"""Train-step metrics written to TensorBoard (those the step returns)."""


def _train_steps(config, workdir, state, task, seams, tx, ckpt, start) -> dict[str, Any]:
    """The training loop from `start` to `config.train.num_steps`; returns info incl. the state."""
    num_steps = config.train.num_steps
    log_every = max(1, config.train.log_every)
    denoiser, spectrum = seams
    train_step = make_train_step(
        denoiser,
        tx,
        optimizer_config(config),
        ema_config(config),
        loss_config(config),
        spectrum,
    )
    batches = task.batches(start)
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    bar = tqdm(total=num_steps, initial=start, desc="train", unit="it", dynamic_ncols=True)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_time, last_step = time.perf_counter(), start
    steady_rates: list[tuple[int, float]] = []
    final_loss = float("nan")
    try:
        for step in range(start, num_steps):
            state, metrics = train_step(state, next(batches))
            pending.append((step, metrics))
            done = step + 1
            if done % log_every == 0 or done == num_steps:
                history = [
                    (s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)
                ]
                pending.clear()
                check_finite_metrics(history)
                now = time.perf_counter()
                rate = (done - last_step) / max(now - last_time, 1e-9)
                if last_step != start:  # the first interval includes compilation
                    steady_rates.append((done - last_step, now - last_time))
                last_time, last_step = now, done
                final_loss = history[-1][1]["loss"]
                for s, m in history:
                    for name in LOGGED_METRICS:
                        if name in m:
                            writer.add_scalar(f"train/{name}", m[name], s)
                writer.add_scalar("train/it_per_s", rate, done)
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{final_loss:.4f}", it_s=f"{rate:.1f}")
            ckpt.save(done, state)
    finally:
        bar.close()
        writer.close()
    steps, secs = sum(n for n, _ in steady_rates), sum(t for _, t in steady_rates)
    it_per_s = steps / secs if secs > 0 else float("nan")
    return {"state": state, "it_per_s": it_per_s, "final_loss": final_loss}


def solver_grid(
    config: ml_collections.ConfigDict,
) -> tuple[list[str], list[int], dict[tuple[str, int], solvers.SolverConfig]]:
    """(row names, NFEs, {(row, nfe): SolverConfig}) to evaluate for the configured model kind.

    GMFlow rows are named "gm_sde", "gm_sde_2", "gm_ode", "gm_ode_2" (order 2 suffixed); GM-ODE uses
    S = ceil(gm_ode_substeps_total / NFE) substeps. A mean-only model gets the baseline rows.
    """
    s = config.sample
    grid: dict[tuple[str, int], solvers.SolverConfig] = {}
    if config.model.mean_only:
        rows, nfes = [str(name) for name in s.baseline_solvers], [int(n) for n in s.baseline_nfes]
        for name in rows:
            for nfe in nfes:
                grid[(name, nfe)] = solvers.SolverConfig(solver=name, num_steps=nfe, shift=s.shift)
        return rows, nfes, grid
    rows, nfes = [], [int(n) for n in s.gm_nfes]
    for solver, order in s.gm_solvers:
        name = str(solver) if int(order) == 1 else f"{solver}_{int(order)}"
        rows.append(name)
        for nfe in nfes:
            substeps = math.ceil(s.gm_ode_substeps_total / nfe) if solver == "gm_ode" else 1
            grid[(name, nfe)] = solvers.SolverConfig(
                solver=str(solver),
                num_steps=nfe,
                num_substeps=max(1, substeps),
                order=int(order),
                shift=s.shift,
            )
    return rows, nfes, grid


def draw_samples(
    denoiser: NNXDenoiser,
    params: PyTree,
    cfg: solvers.SolverConfig,
    key: jax.Array,
    num_samples: int,
    batch_size: int,
) -> np.ndarray:
    """`num_samples` points [N, 2] from sampler `cfg`, in equal jitted batches (one compile per cfg).

    Batch i uses noise and sampler keys from fold_in(key, i), so every solver sees the same noise.
    """
    batch_size = min(batch_size, num_samples)
    chunks = []
    for i in range(math.ceil(num_samples / batch_size)):
        noise_key, sample_key = jax.random.split(jax.random.fold_in(key, i))
        noise = jax.random.normal(noise_key, (batch_size, 1, 1, 2), jnp.float32)
        x0 = solvers.sample(denoiser, params, sample_key, noise, None, cfg)
        chunks.append(np.asarray(jax.device_get(x0)).reshape(batch_size, 2))
    return np.concatenate(chunks)[:num_samples]


def format_table(
    results: Sequence[dict[str, Any]],
    floor: dict[str, float],
    columns: Sequence[str] = METRIC_COLUMNS,
) -> str:
    """A plain-text table: one line per (solver, NFE) and a last line for the exact-sample floor."""
    header = f"{'solver':<14}{'NFE':>5}" + "".join(f"{c:>16}" for c in columns)
    lines = [header, "-" * len(header)]
    for r in results:
        values = "".join(f"{r['metrics'][c]:>16.4f}" for c in columns)
        lines.append(f"{r['row']:<14}{r['nfe']:>5}" + values)
    lines.append(f"{'exact samples':<14}{'':>5}" + "".join(f"{floor[c]:>16.4f}" for c in columns))
    return "\n".join(lines)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    graphdef: nnx.GraphDef,
    ema_params: PyTree,
    train_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample every (solver, NFE) with the EMA params, score, write metrics.json and the PNG grid.

    Returns the metrics.json payload; also prints the table.
    """
    t_start = time.perf_counter()
    keys = jax.random.split(run_keys(config.seed)["eval"], 3)
    noise_key, metric_key, floor_key = keys[0], keys[1], keys[2]
    denoiser = NNXDenoiser(graphdef)
    rows, nfes, grid = solver_grid(config)
    n = int(config.eval.num_samples)
    samples: dict[tuple[str, int], np.ndarray] = {}
    results = []
    bar = tqdm(total=len(grid), desc="eval", unit="run", dynamic_ncols=True)
    for row in rows:
        for nfe in nfes:
            cfg = grid[(row, nfe)]
            bar.set_postfix_str(f"{row} NFE={nfe}")
            t0 = time.perf_counter()
            x = draw_samples(denoiser, ema_params, cfg, noise_key, n, config.sample.batch_size)
            sample_time = time.perf_counter() - t0
            samples[(row, nfe)] = x
            results.append(
                {
                    "row": row,
                    "solver": cfg.solver,
                    "order": cfg.order,
                    "nfe": nfe,
                    "num_substeps": cfg.num_substeps,
                    "metrics": checkerboard_metrics(x, metric_key),
                    "sample_time_s": sample_time,
                }
            )
            bar.update(1)
    bar.close()
    floor = exact_sample_floor(n, floor_key)
    figure_path = os.path.join(workdir, config.eval.figure_file)
    kind = "flow_matching_baseline" if config.model.mean_only else "gmflow"
    histogram_grid_png(figure_path, samples, rows, nfes, title=f"checkerboard, {kind}, EMA, N={n}")
    payload = {
        "model": kind,
        "config": json.loads(config.to_json_best_effort()),
        "train": train_info or {},
        "eval": {"num_samples": n, "wall_time_s": time.perf_counter() - t_start},
        "exact_sample_floor": floor,
        "results": results,
    }
    write_json_atomic(os.path.join(workdir, config.eval.metrics_file), payload)
    table = format_table(results, floor)
    print(table, flush=True)
    payload["table"] = table
    return payload


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming if possible), then evaluate with the EMA params; returns the metrics payload.

    The task of `config.data.name` is made first, so a missing data set stops the run at once. A
    config with a `mesh` section trains with `train.sharded.train_sharded` (joining the
    `jax.distributed` job first); a preempted run returns without evaluating, and a multi-process
    run skips evaluation (evaluate the checkpoint in one process).
    """
    if config.get("mesh") is not None:
        from gmflow_jax.train.sharded import start_distributed

        start_distributed(config)  # before anything touches a device
    task = tasks.make_task(config)
    graphdef, state, info = train(config, workdir, task)
    print(
        f"training: steps {info['start_step']}->{info['steps']} in {info['wall_time_s']:.1f} s"
        + (f", {info['it_per_s']:.2f} it/s" if "it_per_s" in info else " (already finished)"),
        flush=True,
    )
    if info.get("preempted"):
        print(f"preempted: checkpointed step {int(state.step)}; rerun to resume", flush=True)
        return {"train": info}
    if jax.process_count() > 1:
        print("multi-process run: evaluation skipped (evaluate the checkpoint on one host)")
        return {"train": info}
    if not config.eval.enabled:
        return {"train": info}
    return task.evaluate(workdir, graphdef, state.ema_params, info)

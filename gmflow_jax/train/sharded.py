"""The train state and step on a device mesh: shape-first sharded init, the sharded jitted step.

The math is that of `gmflow_jax.train.state` (spec §4.1-4.4 loss, §4.6 AdamW, §4.7 EMA): the sharded step
is `jax.jit` of the very step function `state.make_train_step` compiles for one device, now with
`in_shardings` / `out_shardings` from `gmflow_jax.parallel.sharding` and the state donated. On one
device the two give the same numbers; on a mesh they agree up to the order of floating-point reductions.

Initialization is shape-first: `jax.eval_shape` of the state init gives the abstract state, its
shardings follow from the parameter rules, and `jax.jit(init, out_shardings=...)` creates every leaf
directly in its shards, so the full parameters never exist on one device.

==================================  ============================================================
name                                what it is
==================================  ============================================================
`sharded_init`                      (graphdef, jitted init, state shardings) without running it
`create_sharded_train_state`        (graphdef, sharded TrainState, state shardings)
`sharded_train_step`                `ShardedStep`: the jitted, donating `step(state, batch)`
`abstract_train_state`              ShapeDtypeStructs (with shardings) of the state, for restores
`train_sharded`                     the pod-scale training loop of `python -m gmflow_jax.main`
                                    for a config with a `mesh` section (`configs/imagenet256.py`)
==================================  ============================================================

Batches enter as host-local numpy arrays and become global arrays with
`gmflow_jax.parallel.sharding.global_batch(batch, mesh)`.

`train_sharded(config, workdir, task)` (what `train.loop.train` runs when `config.mesh` exists):

1. `jax.distributed` start-up (`parallel.distributed.initialize_distributed` with
   `config.distributed`, skipped in a single process), then the mesh of `config.mesh` (one of
   data / fsdp / tensor may be -1), its parameter rules `config.mesh.rules` and activation rules
   `config.mesh.activation_rules` (defaults: `DEFAULT_PARAM_RULES`, `DEFAULT_ACTIVATION_RULES`);
2. shape-first sharded init (`sharded_init`), the sharded donating step (`sharded_train_step`);
3. the task's data for this process's rows of each global batch
   (`parallel.sharding.process_batch_rows`): its checkpointable grain iterator
   (`task.data_iterator(rows)`, ArrayRecord latents) when it has one, else
   `task.process_batches(start, rows)` or the rows of `task.batches(start)`;
4. resume order (`checkpoint.restore_or_init`): the workdir's newest valid step (state and data
   iterator; a corrupt newest step falls back to the previous one), else
   `config.checkpoint.restore_from` weights, else fresh; restores land on this run's mesh, whatever
   the device count of the run that saved them;
5. per step: the sharded step, metrics every `log_every` steps (TensorBoard and tqdm on process 0),
   checkpoints (state + data-iterator state) every `checkpoint.every_steps`, and the preemption
   poll: on SIGTERM (single process) or JAX's agreed preemption step (multi-process) the step is
   saved, pending saves are committed and the function returns with `info["preempted"] = True`
   (`train_and_evaluate` then exits with status 0 without evaluating; rerunning resumes there).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.parallel.sharding import (
    DEFAULT_ACTIVATION_RULES,
    DEFAULT_MIN_FSDP_SIZE,
    DEFAULT_PARAM_RULES,
    Rules,
    batch_sharding,
    check_rules,
    global_batch,
    process_batch_rows,
    replicated,
    train_state_shardings,
)
from gmflow_jax.train.ema import EMAConfig
from gmflow_jax.train.optimizer import OptimizerConfig
from gmflow_jax.train.state import LossConfig, TrainState, init_train_state, make_train_step

Array = jax.Array
PyTree = Any


def sharded_init(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    rng: Array,
    mesh: Mesh,
    rules: Rules = DEFAULT_PARAM_RULES,
    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> tuple[nnx.GraphDef, Callable[[], TrainState], TrainState]:
    """(graphdef, jitted init `() -> TrainState` placed on `mesh`, state shardings); nothing runs.

    `model_fn()` builds the freshly initialized network (its init key closed over); `rng` (a raw
    uint32 key) becomes the state's training key. Only shapes are traced here.
    """
    graphdef = nnx.split(nnx.eval_shape(model_fn))[0]
    rng = np.asarray(jax.device_get(rng))  # a host constant: never aliased with a donated buffer

    def init() -> TrainState:
        return init_train_state(model_fn(), tx, rng)[1]

    abstract = jax.eval_shape(init)
    shardings = train_state_shardings(abstract, mesh, rules, min_fsdp_size)
    return graphdef, jax.jit(init, out_shardings=shardings), shardings


def create_sharded_train_state(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    rng: Array,
    mesh: Mesh,
    rules: Rules = DEFAULT_PARAM_RULES,
    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, step-0 TrainState created in its shards on `mesh`, state shardings)."""
    graphdef, init, shardings = sharded_init(model_fn, tx, rng, mesh, rules, min_fsdp_size)
    return graphdef, init(), shardings


def abstract_train_state(init: Callable[[], TrainState]) -> TrainState:
    """ShapeDtypeStructs, with their shardings, of what the jitted `init` of `sharded_init` returns."""
    return jax.eval_shape(init)


def sharded_train_step(
    denoiser: Callable[..., Any],
    tx: optax.GradientTransformation,
    opt_cfg: OptimizerConfig,
    ema_cfg: EMAConfig,
    loss_cfg: LossConfig,
    spectrum: Callable[..., Array] | None,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    activation_rules: Rules | None = DEFAULT_ACTIVATION_RULES,
) -> ShardedStep:
    """The sharded `step(state, batch) -> (state, metrics)`: state in/out on `state_shardings`
    (donated), batch split over ("data", "fsdp"), metrics replicated.

    The step function is `state.make_train_step`'s (same loss, update and EMA). It is traced with
    `mesh` as the abstract mesh and the `activation_rules` active, so the model's activation
    constraints (`models.logical_axes.constrain`) apply; `activation_rules=None` leaves activations to
    GSPMD propagation.
    """
    jitted_single = make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum)
    step_fn = getattr(jitted_single, "__wrapped__", jitted_single)
    rules = check_rules(activation_rules, mesh) if activation_rules is not None else None

    def step_with_rules(state: TrainState, batch: dict[str, Array]):
        # The mesh and rules are entered inside the traced function: this closure is new for every
        # sharded step, so a trace with (or without) activation rules is never reused for another.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), contextlib.ExitStack() as stack:
            if rules is not None:
                stack.enter_context(nnx.logical_axis_rules(rules))
            return step_fn(state, batch)

    jitted = jax.jit(
        step_with_rules,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
    return ShardedStep(jitted, mesh, rules)


class ShardedStep:
    """A jitted sharded train step (its mesh and activation rules are applied inside the trace)."""

    def __init__(self, jitted: Any, mesh: Mesh, activation_rules: Rules | None):
        """Wrap `jitted` (a `jax.jit` with shardings) with `mesh` and `activation_rules`."""
        self.jitted = jitted
        self.mesh = mesh
        self.activation_rules = activation_rules

    def __call__(self, state: TrainState, batch: dict[str, Array]):
        """One step: `(state, batch) -> (state, metrics)`; `state` is donated."""
        return self.jitted(state, batch)

    def lower(self, state: Any, batch: Any) -> Any:
        """`jax.jit(...).lower` on (abstract) arguments, e.g. for `.compile().memory_analysis()`."""
        return self.jitted.lower(state, batch)


MODEL_BATCH_KEYS = ("x0", "labels")
"""Batch entries the train step reads; others (e.g. example "ids") stay on the host."""

StepCallback = Callable[[str, dict[str, Any]], None]
"""`callback(event, fields)`: ("start", {step, how}), ("step", {step, metrics, batch}) after every
step (metrics fetched to the host: a sync per step, for tests and debugging), ("preempted", {step})."""


def _distributed_args(config: Any) -> dict[str, Any]:
    """`initialize_distributed` arguments from the optional `config.distributed` section."""
    d = config.get("distributed") if hasattr(config, "get") else None
    if d is None or not d.get("coordinator_address"):
        return {}
    return {
        "coordinator_address": str(d.coordinator_address),
        "num_processes": int(d.num_processes),
        "process_id": int(d.process_id),
    }


def start_distributed(config: Any) -> None:
    """Join the multi-process job of `config.distributed` / the environment (once; no-op alone)."""
    from gmflow_jax.parallel.distributed import initialize_distributed

    if not jax.distributed.is_initialized():
        initialize_distributed(**_distributed_args(config))


def _row_batches(batches: Iterator[dict[str, Any]], rows: tuple[int, int]):
    """Rows [start, stop) of every global batch of `batches`."""
    start, stop = rows
    for batch in batches:
        yield {k: np.asarray(v)[start:stop] for k, v in batch.items()}


def train_sharded(
    config: Any, workdir: str, task: Any, *, callback: StepCallback | None = None
) -> tuple[nnx.GraphDef, TrainState, dict[str, Any]]:
    """Train (or resume) on the mesh of `config.mesh`; returns (graphdef, final state, info).

    See the module docstring for the sequence. `info` is that of `train.loop.train` (steps,
    start_step, resumed, wall_time_s, it_per_s, final_loss, sessions, train_wall_time_s) plus
    `preempted` and `mesh` (axis sizes). Files (TensorBoard, train_log.json, the task's workdir
    files) are written by process 0 only; checkpoints by every process (orbax).
    """
    from gmflow_jax.checkpoint import Checkpointer, restore_or_init
    from gmflow_jax.data.latents import seek
    from gmflow_jax.parallel.mesh import make_mesh, mesh_shape
    from gmflow_jax.train import loop
    from gmflow_jax.train.optimizer import make_adamw

    start_distributed(config)
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        task.prepare_workdir(workdir)
    mesh_cfg = config.mesh
    mesh = make_mesh(mesh_cfg)
    rules = check_rules(tuple(mesh_cfg.get("rules", DEFAULT_PARAM_RULES)), mesh)
    act_rules = check_rules(tuple(mesh_cfg.get("activation_rules", DEFAULT_ACTIVATION_RULES)), mesh)
    min_fsdp = int(mesh_cfg.get("min_fsdp_size", DEFAULT_MIN_FSDP_SIZE))
    keys = loop.run_keys(config.seed)
    opt_cfg = loop.optimizer_config(config)
    tx = make_adamw(opt_cfg)
    graphdef, init, shardings = sharded_init(
        lambda: task.build_model(keys["init"]), tx, keys["train"], mesh, rules, min_fsdp
    )
    denoiser, spectrum = task.seams(nnx.eval_shape(lambda: task.build_model(keys["init"])))
    num_steps = int(config.train.num_steps)
    batch_size = int(config.train.batch_size)
    rows = process_batch_rows(mesh, batch_size)
    iterator = task.data_iterator(rows) if hasattr(task, "data_iterator") else None

    t_start = time.perf_counter()
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        save_every=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save,
        handle_preemption=True,
    )
    info: dict[str, Any] = {"steps": num_steps, "mesh": mesh_shape(mesh), "preempted": False}
    try:
        state, how = restore_or_init(
            ckpt,
            init,
            restore_from=config.checkpoint.restore_from or None,
            data_iterator=iterator,
        )
        start = int(state.step)
        if lead:
            print(f"train state: {how} (step {start} of {num_steps}, mesh {info['mesh']})")
        info.update(start_step=start, resumed=how)
        if callback is not None:
            callback("start", {"step": start, "how": how})
        if start < num_steps:
            if iterator is not None:
                seek(iterator, start)  # a restored iterator is already there
                batches = iterator
            elif hasattr(task, "process_batches"):
                batches = task.process_batches(start, rows)
            else:
                batches = _row_batches(task.batches(start), rows)
            step_fn = sharded_train_step(
                denoiser,
                tx,
                opt_cfg,
                loop.ema_config(config),
                loop.loss_config(config),
                spectrum,
                mesh=mesh,
                state_shardings=shardings,
                activation_rules=act_rules,
            )
            state, run = _run_steps(
                config, workdir, state, step_fn, batches, iterator, ckpt, mesh, start, callback
            )
            info.update(run)
        if not info["preempted"]:
            ckpt.save(int(state.step), state, force=True, data_iterator=iterator)
    finally:
        ckpt.close()
    info["wall_time_s"] = time.perf_counter() - t_start
    sessions = loop._read_train_log(workdir)
    if "it_per_s" in info:
        sessions.append(
            {
                "start_step": info["start_step"],
                "end_step": int(state.step),
                "wall_time_s": info["wall_time_s"],
                "it_per_s": info["it_per_s"],
                "final_loss": info["final_loss"],
            }
        )
        if lead:
            write_json_atomic(os.path.join(workdir, loop.TRAIN_LOG_FILE), {"sessions": sessions})
    info["sessions"] = sessions
    info["train_wall_time_s"] = sum(r["wall_time_s"] for r in sessions)
    return graphdef, state, info


def _run_steps(config, workdir, state, step_fn, batches, iterator, ckpt, mesh, start, callback):
    """Steps `start` .. num_steps - 1 (or up to a preemption); returns (state, info entries)."""
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    from gmflow_jax.train import loop

    num_steps = int(config.train.num_steps)
    log_every = max(1, int(config.train.log_every))
    lead = jax.process_index() == 0
    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if lead else None
    bar = tqdm(total=num_steps, initial=start, desc="train", unit="it", disable=not lead)
    pending: list[tuple[int, dict[str, Array]]] = []
    last_time, last_step = time.perf_counter(), start
    steady: list[tuple[int, float]] = []
    out: dict[str, Any] = {"final_loss": float("nan")}
    try:
        for step in range(start, num_steps):
            host_batch = next(batches)
            model_batch = {k: host_batch[k] for k in MODEL_BATCH_KEYS if k in host_batch}
            state, metrics = step_fn(state, global_batch(model_batch, mesh))
            pending.append((step, metrics))
            done = step + 1
            if callback is not None:
                callback("step", {"step": step, "metrics": metrics, "batch": host_batch})
            if done % log_every == 0 or done == num_steps:
                history = [
                    (s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)
                ]
                pending.clear()
                loop.check_finite_metrics(history)
                now = time.perf_counter()
                rate = (done - last_step) / max(now - last_time, 1e-9)
                if last_step != start:  # the first interval includes compilation
                    steady.append((done - last_step, now - last_time))
                last_time, last_step = now, done
                out["final_loss"] = history[-1][1]["loss"]
                if writer is not None:
                    for s, m in history:
                        for name in loop.LOGGED_METRICS:
                            if name in m:
                                writer.add_scalar(f"train/{name}", m[name], s)
                    writer.add_scalar("train/it_per_s", rate, done)
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{out['final_loss']:.4f}", it_s=f"{rate:.1f}")
            ckpt.save(done, state, data_iterator=iterator)
            if ckpt.reached_preemption(done):
                ckpt.save(done, state, force=True, data_iterator=iterator)
                out["preempted"] = True
                if callback is not None:
                    callback("preempted", {"step": done})
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    n, secs = sum(k for k, _ in steady), sum(t for _, t in steady)
    out["it_per_s"] = n / secs if secs > 0 else float("nan")
    return state, out

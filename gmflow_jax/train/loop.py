"""The training loop: one loop, always on a device mesh, for every task and every scale.

`train(config, workdir, task, keys)` (docs/math.md §4 for what a step computes):

1. the mesh of `config.mesh`, or, for a config without one, the default mesh (`MeshConfig()`: every
   device on "fsdp", parameters sharded only above `min_fsdp_size`; one device on a laptop, where
   every sharding is trivial). Its parameter rules `config.mesh.rules` and activation rules
   `config.mesh.activation_rules` default to `DEFAULT_PARAM_RULES` / `DEFAULT_ACTIVATION_RULES`;
2. shape-first init on the mesh (`step.init_on_mesh`) of the network that `models.builder.build_model`
   makes from `config.model`, and the pure step (`step.make_train_step`) jitted once with the state
   and batch shardings and the state donated (`step.jit_train_step`);
3. the task's data for this process's rows of each global batch (`parallel.sharding.process_rows`):
   its checkpointable iterator (`task.data_iterator`, e.g. grain over ArrayRecord) when it has one,
   else `task.batches(start, layout)`;
4. resume order (`checkpoint.restore_or_init`): the workdir's newest valid step (state and data
   iterator), else `config.checkpoint.restore_from` weights, else fresh; a restore lands on this
   run's mesh whatever the device count of the run that saved it;
5. per step: the jitted step, the metrics to `reporting.TrainReporter` (a host sync only every
   `log_every` steps, plus one after the first step: the compile time, reported once and kept out
   of the rates; one progress line with steps/s, images/s, MFU for GM-DiT, ETA), a checkpoint every
   `checkpoint.every_steps`, and the preemption poll: on SIGTERM (single process) or JAX's agreed
   preemption step (several processes) the step is saved, pending saves are committed, and
   `info["preempted"]` is True (the run exits 0; rerunning resumes);
6. seeing the run: `config.profile` traces a few steps into `workdir/profile`
   (`profiling.StepProfiler`); `config.eval.every_steps` > 0 runs the task's small evaluation
   (`Task.evaluate_during_training`) on the EMA parameters every that many steps, its scalars and
   sample image going to TensorBoard (`eval/...`); both are kept out of the step rate.

Random streams: `task.run_keys(config.seed)` gives independent keys for model init, training (step i
uses fold_in(key, i)), data and evaluation; a resumed run therefore continues bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.experimental import multihost_utils

from gmflow_jax.checkpoint import Checkpointer, restore_or_init
from gmflow_jax.data.latents import seek
from gmflow_jax.models.builder import build_model, gm_dit_config_from
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.parallel.distributed import start_distributed
from gmflow_jax.parallel.mesh import make_mesh, mesh_shape
from gmflow_jax.parallel.sharding import (
    DEFAULT_ACTIVATION_RULES,
    DEFAULT_MIN_FSDP_SIZE,
    DEFAULT_PARAM_RULES,
    check_rules,
    global_batch,
    process_rows,
)
from gmflow_jax.paths import join, make_dirs
from gmflow_jax.run_config import check_run_config, restart_requested
from gmflow_jax.train.flops import devices_peak_flops, gm_dit_train_flops
from gmflow_jax.train.health import check_finite_state
from gmflow_jax.train.optimizer import make_adamw
from gmflow_jax.train.profiling import ProfileSettings, StepProfiler, profile_settings
from gmflow_jax.train.reporting import TrainReporter, read_train_log, record_session
from gmflow_jax.train.state import TrainState
from gmflow_jax.train.step import (
    MODEL_BATCH_KEYS,
    init_on_mesh,
    jit_train_step,
    make_train_step,
    step_settings,
)
from gmflow_jax.train.task import Batch, BatchLayout, Task

StepCallback = Callable[[str, dict[str, Any]], None]
"""`callback(event, fields)`: ("start", {step, how}), ("step", {step, metrics, batch}) after every
step (metrics fetched to the host: a sync per step, for tests and debugging), ("preempted", {step})."""


def run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of `config.mesh`, or the default mesh over every device when the config has none.

    Why every device and not only this process's: a mesh must span every process of a job.
    """
    return make_mesh(config.get("mesh"))


def periodic_eval_every(config: ml_collections.ConfigDict) -> int:
    """`config.eval.every_steps` (0 or absent: no evaluation during training), checked."""
    every = config.eval.get("every_steps", 0) if "eval" in config else 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"config.eval.every_steps must be an int >= 0 (0 = off), got {every!r}")
    return every


def model_flops_per_step(model_cfg: ml_collections.ConfigDict, batch_size: int) -> float | None:
    """Model FLOPs of one train step on the global batch: the GM-DiT formula (`train.flops`), or
    None for other networks (no MFU is reported for them)."""
    if model_cfg.get("name") != "gm_dit":
        return None
    return gm_dit_train_flops(gm_dit_config_from(model_cfg), batch_size)


def _to_global(batch: Batch, layout: BatchLayout) -> dict[str, jax.Array]:
    """The model's entries of a task batch as global arrays on the mesh (see `Task.batches`)."""
    model_batch = {k: batch[k] for k in MODEL_BATCH_KEYS if k in batch}
    if all(isinstance(v, jax.Array) for v in model_batch.values()):
        return model_batch  # made on the devices, already global
    return global_batch(model_batch, layout.mesh, layout.global_batch_size)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    keys: dict[str, jax.Array],
    *,
    callback: StepCallback | None = None,
) -> tuple[nnx.GraphDef, TrainState, dict[str, Any]]:
    """Train (or resume) in `workdir`; returns (graphdef, final state, info).

    `info`: steps, start_step, resumed (how the state was obtained), mesh (axis sizes), preempted,
    wall_time_s of this invocation and, when steps ran, it_per_s (steady-state steps/s from the end
    of the first step: compilation, periodic evaluation and tracing excluded), compile_s (up to the
    end of the first step), final_loss and, for GM-DiT, mfu (None when the device's peak is
    unknown, e.g. on CPU); `sessions` lists every invocation that trained in this workdir (kept in
    `train_log.json`) and `train_wall_time_s` sums their wall times.
    Files (TensorBoard, train_log.json, the task's workdir files) are written by process 0 only;
    checkpoints by every process (orbax).
    """
    start_distributed(config)  # no-op in a single process or when already joined
    lead = jax.process_index() == 0
    make_dirs(workdir)
    if lead:
        task.prepare_workdir(workdir)
    mesh = run_mesh(config)
    mesh_cfg = config.get("mesh") or {}
    rules = check_rules(tuple(mesh_cfg.get("rules", DEFAULT_PARAM_RULES)), mesh)
    act_rules = check_rules(tuple(mesh_cfg.get("activation_rules", DEFAULT_ACTIVATION_RULES)), mesh)
    min_fsdp = int(mesh_cfg.get("min_fsdp_size", DEFAULT_MIN_FSDP_SIZE))
    opt_cfg, ema_cfg, loss_cfg = step_settings(config)
    profile = profile_settings(config.get("profile"))
    eval_every = periodic_eval_every(config)
    tx = make_adamw(opt_cfg)

    def model_fn() -> nnx.Module:
        return build_model(config.model, keys["init"])

    graphdef, init, shardings = init_on_mesh(model_fn, tx, keys["train"], mesh, rules, min_fsdp)
    denoiser, spectrum = network_functions(nnx.eval_shape(model_fn))
    num_steps = int(config.train.num_steps)
    batch_size = int(config.train.batch_size)
    layout = BatchLayout(mesh, batch_size, process_rows(mesh, batch_size))
    flops_per_step = model_flops_per_step(config.model, batch_size)
    iterator = task.data_iterator(layout)

    t_start = time.perf_counter()
    ckpt = Checkpointer(
        join(workdir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        save_every=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save,
        handle_preemption=True,
    )
    info: dict[str, Any] = {"steps": num_steps, "mesh": mesh_shape(mesh), "preempted": False}
    try:
        # Before anything is restored: a workdir's checkpoints only resume the run that wrote them
        # (a changed model, optimizer, data or loss field is refused with a diff), unless a restart
        # is asked for explicitly, which moves the old checkpoints aside (never deletes them).
        check_run_config(config, workdir, has_checkpoints=bool(ckpt.all_steps()), write=lead)
        if restart_requested(config) and ckpt.all_steps():
            moved = ckpt.move_all_aside("restarted")
            if lead:
                print(f"checkpoint.restart: moved the previous checkpoints to {moved}")
        state, how = restore_or_init(
            ckpt, init, restore_from=config.checkpoint.restore_from or None, data_iterator=iterator
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
                batches: Iterator[Batch] = iterator
            else:
                batches = task.batches(start, layout)
            step_fn = jit_train_step(
                make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum),
                mesh,
                shardings,
                act_rules,
            )
            reporter = TrainReporter(
                workdir,
                config,
                start,
                num_steps,
                int(config.train.log_every),
                lead,
                batch_size=batch_size,
                flops_per_step=flops_per_step,
                peak_flops=devices_peak_flops(list(mesh.devices.flat)),
                max_consecutive_skips=int(config.train.get("max_consecutive_skips", 100)),
            )
            watch = _Watch(task, graphdef, workdir, eval_every, profile, reporter, start)
            state, run = _run_steps(
                config, state, step_fn, batches, layout, iterator, ckpt, start, callback, watch
            )
            info.update(run)
        if not info["preempted"] and int(state.step) not in ckpt.all_steps():
            check_finite_state(state, int(state.step))
            ckpt.save(int(state.step), state, force=True, data_iterator=iterator)
    finally:
        ckpt.close()
    info["wall_time_s"] = time.perf_counter() - t_start
    if "it_per_s" in info:
        session = {
            "start_step": info["start_step"],
            "end_step": int(state.step),
            "wall_time_s": info["wall_time_s"],
            "it_per_s": info["it_per_s"],
            "compile_s": info["compile_s"],
            "final_loss": info["final_loss"],
        }
        if flops_per_step is not None:
            session.update(flops_per_step=flops_per_step, mfu=info.get("mfu"))
        info["sessions"] = record_session(workdir, session, write=lead)
    else:
        info["sessions"] = read_train_log(workdir)
    info["train_wall_time_s"] = sum(r["wall_time_s"] for r in info["sessions"])
    return graphdef, state, info


class _Watch:
    """What the loop does besides stepping: the reporter, the profiler, the periodic evaluation."""

    def __init__(
        self,
        task: Task,
        graphdef: nnx.GraphDef,
        workdir: str,
        eval_every: int,
        profile: ProfileSettings,
        reporter: TrainReporter,
        start: int,
    ):
        self.task, self.graphdef, self.workdir = task, graphdef, workdir
        self.eval_every = eval_every
        self.reporter = reporter
        self.profiler = StepProfiler(workdir, profile, first_step=start, pause=reporter.paused)

    def after_step(self, step: int, state: TrainState, metrics: dict[str, jax.Array]) -> None:
        """Report the metrics, stop a finished trace, and evaluate when `step + 1` is due."""
        self.reporter.add(step, metrics)
        self.profiler.after_step(step, metrics)
        done = step + 1
        if self.eval_every and done % self.eval_every == 0:
            self.evaluate(done, state)

    def evaluate(self, done: int, state: TrainState) -> None:
        """The task's small evaluation of the EMA parameters, logged by the reporter (process 0).

        Why a gather first: in a multi-process job the parameters are sharded across hosts; every
        process joins the all-gather (a collective), then only process 0 samples, on its own
        devices, while the others wait at the next step's collectives.
        """
        with self.reporter.paused():
            params = state.ema_params
            if jax.process_count() > 1:
                params = multihost_utils.process_allgather(params, tiled=True)
            if jax.process_index() == 0:
                scalars, image = self.task.evaluate_during_training(
                    self.workdir, self.graphdef, params, done
                )
                self.reporter.write_eval(done, scalars, image)

    def close(self) -> None:
        """Stop a trace still running, close TensorBoard."""
        try:
            self.profiler.close()
        finally:
            self.reporter.close()


def _save(ckpt, reporter, state, done, iterator, *, force: bool) -> None:
    """Save step `done` unless something non-finite would be saved.

    Why the checks here: a checkpoint is what a rerun trusts, so the pending metrics are fetched and
    checked first (a non-finite loss was applied to the weights) and then the parameters and EMA
    themselves (one fused reduction); either raises, naming the step, with the last good
    checkpoint left intact (max_to_keep never rotates it out for a bad one).
    """
    reporter.flush(done)
    check_finite_state(state, done)
    ckpt.save(done, state, force=force, data_iterator=iterator)


def _run_steps(config, state, step_fn, batches, layout, iterator, ckpt, start, callback, watch):
    """Steps `start` .. num_steps - 1 (or up to a preemption); returns (state, info entries)."""
    num_steps = int(config.train.num_steps)
    reporter = watch.reporter
    out: dict[str, Any] = {}
    try:
        for step in range(start, num_steps):
            host_batch = next(batches)
            with watch.profiler.step(step):
                state, metrics = step_fn(state, _to_global(host_batch, layout))
            watch.after_step(step, state, metrics)
            done = step + 1
            if callback is not None:
                callback("step", {"step": step, "metrics": metrics, "batch": host_batch})
            if done % reporter.log_every == 0:
                ckpt.check_errors()  # a failed background save stops the run with its error
            if done % ckpt.save_every == 0:
                _save(ckpt, reporter, state, done, iterator, force=False)
            if ckpt.reached_preemption(done):
                _save(ckpt, reporter, state, done, iterator, force=True)
                out["preempted"] = True
                if callback is not None:
                    callback("preempted", {"step": done})
                break
    finally:
        watch.close()
    out.update(it_per_s=reporter.it_per_s, compile_s=reporter.compile_s)
    out.update(final_loss=reporter.final_loss)
    if reporter.progress.flops_per_step is not None:  # GM-DiT: MFU (None when the peak is unknown)
        out["mfu"] = reporter.mfu
    return state, out

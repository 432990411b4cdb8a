"""Checkpoints of a training run: one orbax `CheckpointManager`, the resume order, corrupt-step fallback.

A checkpoint step directory holds the item "state" (the whole `TrainState`: params, optimizer state,
EMA, step, rng) and, optionally, extra items (e.g. a grain data-iterator state under "data") passed as
orbax `CheckpointArgs`. Saving is asynchronous (the call returns once the arrays are copied off the
device; the commit of a step is atomic, done by orbax); `Checkpointer.close` waits for pending saves.

Resume order of `restore_or_init`:

1. the newest step of this run's own checkpoint directory that restores; a step that fails to restore
   (truncated/corrupt files) is logged with a warning naming it, moved aside to `<directory>.corrupt/`,
   and the previous step is tried;
2. else, when `restore_from` names another run's checkpoint directory, a fresh state whose params and
   EMA params are that run's newest step (optimizer state, step and rng start fresh: fine-tuning; the
   other run's directory is only read);
3. else a fresh state from `init_fn`.

Restoring onto another mesh or device count: the restore target is `jax.eval_shape(init_fn)`, whose
leaves carry the shardings of `init_fn`'s outputs (e.g. the jitted init of `train.step.init_on_mesh`
on the new mesh), and orbax reads every array straight into those shardings.

With several processes every decision that changes the control flow is taken jointly: a step counts as
restorable only if it restored on every process (the others fall back too), and only process 0 moves a
corrupt step aside (then all processes wait for each other).

Data iterator (`data_iterator=` of `save` / `restore` / `restore_or_init`): a grain iterator is saved
under the item "data" (`grain.checkpoint.CheckpointSave`, one JSON state per process) with every step,
and restored in place. A step written by a different number of processes (or without the item) has no
state for this process: the iterator is then left as it is and the restore reports it, so the caller
positions it from the restored step (`gmflow_jax.data.latents.seek`).

Preemption (`Checkpointer(..., handle_preemption=True)`, then `reached_preemption(step)` every step):

* single process (no `jax.distributed`): SIGTERM (and any signal in `preemption_signals`) sets a flag;
  `reached_preemption` returns it. The handler replaces the previous one until `close`.
* multi-process (`jax.distributed` initialized): JAX's preemption service already turns SIGTERM on any
  host into one agreed step; `reached_preemption` is orbax's `CheckpointManager.reached_preemption`,
  which every process must call at every step.

When it returns True the loop saves that step (`save(..., force=True)`), calls `close` (which waits for
the asynchronous commit) and exits with status 0; rerunning the same command resumes there.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any

STATE_ITEM = "state"
"""Name of the train-state item inside a checkpoint step."""

DATA_ITEM = "data"
"""Name of the data-iterator item inside a checkpoint step."""

PREEMPTION_SIGNALS = (signal.SIGTERM,)
"""Signals treated as a preemption notice by default."""

MIN_REPLICA_PARALLEL_BYTES = 1 << 20
"""Replicated arrays are written by several replicas in parallel (orbax replica-parallel saving)
only when each replica's slice has at least this many bytes. Slicing costs one small compiled
program per (shape, device) at the first save; below this size it buys nothing."""

_array_handler_configured = False


def _configure_array_handler() -> None:
    """Register orbax's jax.Array handler with the `MIN_REPLICA_PARALLEL_BYTES` floor (once)."""
    global _array_handler_configured
    if _array_handler_configured:
        return
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES
        ),
        override=True,
    )
    _array_handler_configured = True


def _distributed() -> bool:
    """Whether `jax.distributed` is initialized (then JAX owns SIGTERM and the preemption sync)."""
    return jax.distributed.is_initialized()


def _all_processes_agree(ok: bool) -> bool:
    """True iff `ok` holds on every process (a collective when there are several processes)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([1 if ok else 0], np.int32))
    return bool(np.all(np.asarray(flags)))


def _sync(name: str) -> None:
    """A barrier across processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _data_save_args(iterator: Any) -> ocp.args.CheckpointArgs:
    """Orbax save args of a grain iterator's state."""
    import grain

    return grain.checkpoint.CheckpointSave(iterator)


def _data_restore_args(iterator: Any) -> ocp.args.CheckpointArgs:
    """Orbax restore args that set a grain iterator's state in place."""
    import grain

    return grain.checkpoint.CheckpointRestore(iterator)


def data_state_file(step_dir: epath.Path) -> epath.Path:
    """This process's grain state file inside a step directory (`data/process_i-of-n.json`)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return epath.Path(step_dir) / DATA_ITEM / name


class Checkpointer:
    """Save and restore a train state (and optional extra items) under one directory."""

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        max_to_keep: int = 3,
        save_every: int = 1000,
        async_save: bool = True,
        handle_preemption: bool = False,
        preemption_signals: Sequence[int] = PREEMPTION_SIGNALS,
    ):
        """Open (creating it if needed) the checkpoint directory; keep the newest `max_to_keep` steps.

        With `handle_preemption`, a single process installs a handler for `preemption_signals`
        (main thread only); see the module docstring.
        """
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        _configure_array_handler()
        self.directory = epath.Path(directory).absolute()
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_every,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )
        self._preempted = threading.Event()
        self._previous_handlers: dict[int, Any] = {}
        if handle_preemption and not _distributed():
            for sig in preemption_signals:
                self._previous_handlers[sig] = signal.signal(sig, self._on_preemption_signal)

    def _on_preemption_signal(self, signum: int, frame: Any) -> None:
        """Signal handler: remember the preemption notice (the loop polls `reached_preemption`)."""
        del frame
        logging.warning("Received signal %d: will checkpoint and stop at the next step.", signum)
        self._preempted.set()

    def reached_preemption(self, step: int) -> bool:
        """Whether the run must checkpoint at `step` and stop (see the module docstring).

        Multi-process: every process must call this at every step (JAX's preemption sync point).
        """
        if _distributed():
            return bool(self._manager.reached_preemption(int(step)))
        return self._preempted.is_set()

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        force: bool = False,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
        data_iterator: Any = None,
    ) -> bool:
        """Save `state` as step `step` if it is a multiple of `save_every` (or `force`); True if saved.

        A step that already exists is not saved again (returns False). `data_iterator` (a grain
        iterator) is saved under the item "data".
        """
        step = int(step)
        if not force and step % self.save_every != 0:
            return False
        if step in self._manager.all_steps():
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state), **(extra or {})}
        if data_iterator is not None:
            items[DATA_ITEM] = _data_save_args(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        step: int,
        abstract_state: PyTree,
        *,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
        data_iterator: Any = None,
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restore step `step` into the structure/shapes/shardings of `abstract_state`; (state, extras).

        With `data_iterator`, its state is restored in place when the step holds one for this process
        (then `extras["data"]` is the iterator); otherwise `extras` has no "data" key.
        """
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state), **(extra or {})}
        if data_iterator is not None:
            if data_state_file(self.directory / str(int(step))).exists():
                items[DATA_ITEM] = _data_restore_args(data_iterator)
            else:
                logging.warning(
                    "Checkpoint step %d in %s has no data-iterator state for process %d of %d; "
                    "the iterator is not restored.",
                    step,
                    self.directory,
                    jax.process_index(),
                    jax.process_count(),
                )
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        names = [k for k in items if k != STATE_ITEM]
        return restored[STATE_ITEM], {k: restored[k] for k in names}

    def restore_latest(
        self,
        abstract_state: PyTree,
        *,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
        data_iterator: Any = None,
    ) -> tuple[PyTree, int, dict[str, Any]] | None:
        """Restore the newest step that restores, moving aside corrupt newer ones; None if none does.

        With several processes a step counts only if it restored on all of them.
        """
        for step in reversed(self.all_steps()):
            error: Exception | None = None
            try:
                state, extras = self.restore(
                    step, abstract_state, extra=extra, data_iterator=data_iterator
                )
            except Exception as err:  # noqa: BLE001 - any failure to read a step means "try older"
                error = err
            if not _all_processes_agree(error is None):
                reason = (
                    f"{type(error).__name__}: {error}" if error else "failed on another process"
                )
                logging.warning(
                    "Checkpoint step %d in %s failed to restore (%s); falling back to the "
                    "previous step.",
                    step,
                    self.directory,
                    reason,
                )
                self._quarantine(step)
                continue
            return state, step, extras
        return None

    def _quarantine(self, step: int) -> None:
        """Move a corrupt step out of the manager's directory, to `<directory>.corrupt/<step>-<time>`.

        Only process 0 moves it; all processes then wait for each other and reload the step list.
        """
        if jax.process_index() == 0:
            target_root = epath.Path(str(self.directory) + ".corrupt")
            target_root.mkdir(parents=True, exist_ok=True)
            target = target_root / f"{step}-{int(time.time())}"
            (self.directory / str(step)).rename(target)
            logging.warning("Moved corrupt checkpoint step %d to %s.", step, target)
        _sync(f"gmflow_quarantine_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, release the manager and restore the previous signal handlers."""
        self._manager.wait_until_finished()
        self._manager.close()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def __enter__(self) -> Checkpointer:
        """Context manager entry: the checkpointer itself."""
        return self

    def __exit__(self, *exc) -> None:
        """Context manager exit: `close`."""
        self.close()


def restore_or_init(
    checkpointer: Checkpointer,
    init_fn: Callable[[], PyTree],
    *,
    restore_from: str | None = None,
    extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
    data_iterator: Any = None,
) -> tuple[PyTree, str]:
    """The train state to start from, and a one-line description of where it came from.

    Order (see the module docstring): own latest valid step -> `restore_from` weights -> `init_fn()`.
    `init_fn` must build a `TrainState`-like pytree with `params` and `ema_params` fields; it is traced
    with `jax.eval_shape` for the restore target and only called when nothing restores. `extra` items
    are restored only from the run's own checkpoints (their restored values are not returned here;
    restore-args such as grain's `CheckpointRestore` update their iterator in place). `data_iterator`
    (grain) is restored in place when the step holds its state for this process; the description
    says whether it was.

    For a sharded run pass the jitted init of `train.step.init_on_mesh`: the restore target then
    carries the (new) mesh's shardings.
    """
    abstract = jax.eval_shape(init_fn)
    found = checkpointer.restore_latest(abstract, extra=extra, data_iterator=data_iterator)
    if found is not None:
        state, step, extras = found
        how = f"resumed from step {step} of {checkpointer.directory}"
        if data_iterator is not None:
            how += (
                "; data iterator restored"
                if DATA_ITEM in extras
                else "; data iterator not in the checkpoint for this process count"
            )
        return state, how
    state = init_fn()
    if restore_from:
        weights, step = restore_weights(
            restore_from, {"params": abstract.params, "ema_params": abstract.ema_params}
        )
        state = state.replace(params=weights["params"], ema_params=weights["ema_params"])
        return state, f"params and EMA from step {step} of {restore_from}; fresh optimizer and step"
    return state, "fresh initialization"


def restore_weights(directory: str | epath.PathLike, abstract_weights: dict[str, PyTree]):
    """Restore only the named fields (e.g. params, ema_params) of another run's newest step.

    Returns (weights dict, step). The other run's directory is only read (nothing is moved or created);
    fields not named (optimizer state, step, rng) are ignored, so their structure may differ.
    """
    directory = epath.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"restore_from directory {str(directory)!r} does not exist")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            create=False, read_only=True, save_interval_steps=0, max_to_keep=None
        ),
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"restore_from={str(directory)!r} holds no checkpoint")
        args = ocp.args.PyTreeRestore(
            item=abstract_weights,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_weights),
            partial_restore=True,
        )
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))
    finally:
        manager.close()
    return restored[STATE_ITEM], step

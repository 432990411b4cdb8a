"""Checkpoints of a training run: one orbax `CheckpointManager`, the resume order, corrupt-step fallback.

A checkpoint step directory holds the item "state" (the whole `TrainState`: params, optimizer state,
EMA, step, rng) and, optionally, extra items (e.g. a grain data-iterator state under "data") passed as
orbax `CheckpointArgs`. Saving is asynchronous (the call returns once the arrays are copied off the
device; the commit of a step is atomic, done by orbax); `Checkpointer.close` waits for pending saves.

Resume order of `restore_or_init`:

1. the newest step of this run's own checkpoint directory that restores and verifies. Only a step
   whose files or arrays differ from what was written (a truncated or missing file, a flipped byte:
   see "Integrity" below) counts as corrupt: it is logged with a warning naming it and the damage,
   moved aside to `<directory>.corrupt/`, and the previous step is tried. A step whose arrays do not
   match this run's state (structure, shapes, dtypes: the config changed) raises
   `CheckpointMismatchError`, any other restore error is re-raised, and when every step is corrupt
   `NoRestorableCheckpointError` lists them: in these cases nothing is moved;
2. else, when `restore_from` names another run's checkpoint directory, a fresh state whose params and
   EMA params are that run's newest intact step (optimizer state, step and rng start fresh:
   fine-tuning; the other run's directory is only read). Its steps are verified like our own (files,
   then the checksums of the restored fields); a corrupt one is skipped with a warning naming it;
3. else a fresh state from `init_fn`.

Integrity. Every step holds, beside the state, the item "integrity" (JSON, committed with the step by
orbax): for every array of the state its path, shape, dtype and a 64-bit checksum of its bits
(`array_checksums`, one fused jitted reduction on the devices, independent of the sharding). After a
step commits, process 0 writes `MANIFEST_FILE` into the step directory (atomically): the size and
SHA-256 of every file of the step. On restore, process 0 first checks the files against the manifest
(a difference is corruption), then the record's structure against the restore target (a difference
is a mismatch), then the restored arrays' checksums against the record (a difference is corruption).
With the files verified intact, a restore error is not corruption: it is re-raised. A step without a
manifest (the process died between the commit and the manifest) gets one once it restored and its
checksums matched.

Saving. A failed save raises `CheckpointSaveError` naming the step: at once when the step directory
cannot be created, else from the next `check_errors` (poll it every logging interval), `save`, `wait`
or `close` once the background commit has failed; `close` releases everything even then.

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

import concurrent.futures
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.paths import is_local

PyTree = Any

STATE_ITEM = "state"
"""Name of the train-state item inside a checkpoint step."""

DATA_ITEM = "data"
"""Name of the data-iterator item inside a checkpoint step."""

INTEGRITY_ITEM = "integrity"
"""Name of the JSON item holding every state array's path, shape, dtype and checksum."""

MANIFEST_FILE = "gmflow_manifest.json"
"""File in a committed step directory: size and SHA-256 of every other file of the step."""

_HASH_CHUNK = 8 << 20
"""Bytes read at a time when hashing checkpoint files."""


class CheckpointError(RuntimeError):
    """Base of the checkpoint errors below."""


class CheckpointCorruptError(CheckpointError):
    """A step whose files or arrays differ from what was written (restore falls back past it)."""


class CheckpointMismatchError(CheckpointError):
    """A step whose arrays do not match the restore target (the config changed): fatal."""


class NoRestorableCheckpointError(CheckpointError):
    """Every step of the directory is corrupt (nothing was moved)."""


class CheckpointSaveError(CheckpointError):
    """A save failed (the step is not on disk); training must stop."""


PREEMPTION_SIGNALS = (signal.SIGTERM,)
"""Signals treated as a preemption notice by default."""

MIN_REPLICA_PARALLEL_BYTES = 1 << 20
"""Replicated arrays are written by several replicas in parallel (orbax replica-parallel saving)
only when each replica's slice has at least this many bytes. Slicing costs one small compiled
program per (shape, device) at the first save; below this size it buys nothing."""


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the "state" item: orbax's PyTree handler with its own type-handler registry,
    orbax's defaults except a jax.Array handler with the `MIN_REPLICA_PARALLEL_BYTES` floor.

    Why a registry of our own: overriding the global jax.Array handler
    (`ocp.type_handlers.register_type_handler(..., override=True)`) logs an orbax warning on every
    run and changes every other orbax user in the process; a registry passed to the handler does
    neither. The files are the same as `StandardSave`'s (StandardCheckpointHandler wraps this
    handler), so steps written either way restore either way.
    """
    defaults = [
        (ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()
        if ty is not jax.Array
    ]
    array_handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES
    )
    registry = ocp.type_handlers.create_type_handler_registry(*defaults, (jax.Array, array_handler))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Item handlers of our `CheckpointManager`: "state" by `_state_handler`; every other item
    (integrity JSON, grain data, callers' extras) by orbax's global registration of its args."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handler = _state_handler()
    registry.add(STATE_ITEM, ocp.args.PyTreeSave, handler)
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, handler)
    return registry


def _restore_args(abstract: PyTree, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore args reading every array of `abstract` into its shape, dtype and sharding.

    Every leaf gets `ArrayRestoreArgs` (strict: a stored array of another shape is an error, never
    padded or cut); a leaf without a sharding (a state built outside a mesh) goes to the default
    device. `partial`: the checkpoint may hold more than `abstract` (`restore_weights`).
    """

    def sharding(leaf: Any) -> Any:
        found = getattr(leaf, "sharding", None)
        return found if found is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])

    shardings = jax.tree.map(sharding, abstract)
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract, shardings),
        partial_restore=partial,
    )


def _distributed() -> bool:
    """Whether `jax.distributed` is initialized (then JAX owns SIGTERM and the preemption sync)."""
    return jax.distributed.is_initialized()


def _all_processes_agree(ok: bool) -> bool:
    """True iff `ok` holds on every process (a collective when there are several processes)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([1 if ok else 0], np.int32))
    return bool(np.all(np.asarray(flags)))


def _sync(name: str) -> None:
    """A barrier across processes (no-op in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _data_save_args(iterator: Any) -> ocp.args.CheckpointArgs:
    """Orbax save args of a grain iterator's state."""
    return grain.checkpoint.CheckpointSave(iterator)


def _data_restore_args(iterator: Any) -> ocp.args.CheckpointArgs:
    """Orbax restore args that set a grain iterator's state in place."""
    return grain.checkpoint.CheckpointRestore(iterator)


def data_state_file(step_dir: epath.Path) -> epath.Path:
    """This process's grain state file inside a step directory (`data/process_i-of-n.json`)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return epath.Path(step_dir) / DATA_ITEM / name


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The bits of an array as a flat uint32 vector (one entry per element)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if unsigned is None:
        raise TypeError(f"cannot checksum an array of dtype {x.dtype}")
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer (a bijective mix of uint32 values)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums over the element bits b_i: sum b_i (2i+1) and sum fmix(b_i ^ golden i).

    Why the first: a change of any single element by d != 0 changes it by d (2i+1) mod 2^32, never
    0 since 2i+1 is odd; every one-bit flip is therefore detected. The second mixes the bits so
    that structured multi-element changes (swaps, shifts) are caught with probability 1 - 2^-32.
    """
    bits = _leaf_bits(x)
    index = jax.lax.iota(jnp.uint32, bits.shape[0])
    weighted = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_fmix32(bits ^ (index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


@jax.jit
def _tree_checksums(leaves: list[jax.Array]) -> jax.Array:
    """[num_leaves, 2] uint32 checksums of a list of arrays, in one compiled program."""
    if not leaves:
        return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack([_leaf_checksum(x) for x in leaves])


def _array_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(path string, leaf) of every array leaf of `tree`."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat if hasattr(leaf, "shape")]


def _dtype_name(dtype: Any) -> str:
    """A dtype's name (typed PRNG keys by their key implementation)."""
    return str(dtype) if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).name


def array_checksums(tree: PyTree) -> dict[str, dict[str, Any]]:
    """{path: {"shape", "dtype", "checksum"}} of every array of `tree` (host values; one sync).

    The checksum (16 hex digits) depends only on the global array's values, not on its sharding.
    """
    named = _array_leaves(tree)
    sums = np.asarray(jax.device_get(_tree_checksums([jnp.asarray(x) for _, x in named])))
    return {
        path: {
            "shape": [int(d) for d in x.shape],
            "dtype": _dtype_name(x.dtype),
            "checksum": f"{int(sums[i, 0]):08x}{int(sums[i, 1]):08x}",
        }
        for i, (path, x) in enumerate(named)
    }


def structure_differences(
    record: Mapping[str, Mapping[str, Any]], abstract_state: PyTree, limit: int = 8
) -> list[str]:
    """Human-readable differences between a step's array record and a restore target (empty: none).

    Paths only in the checkpoint, only in the target, and shape / dtype differences, at most `limit`
    of each kind (then a count).
    """
    target = {
        path: {"shape": [int(d) for d in x.shape], "dtype": _dtype_name(x.dtype)}
        for path, x in _array_leaves(abstract_state)
    }
    lines: list[str] = []

    def add(kind: str, items: list[str]) -> None:
        shown = items[:limit]
        if items:
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{kind}: {', '.join(shown)}{more}")

    add("only in the checkpoint", sorted(set(record) - set(target)))
    add("only in this run's state", sorted(set(target) - set(record)))
    changed = []
    for path in sorted(set(record) & set(target)):
        old, new = record[path], target[path]
        if list(old["shape"]) != new["shape"] or old["dtype"] != new["dtype"]:
            changed.append(
                f"{path} {tuple(old['shape'])} {old['dtype']} in the checkpoint, "
                f"{tuple(new['shape'])} {new['dtype']} now"
            )
    add("shape/dtype", changed)
    return lines


def _hash_file(path: epath.Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of one file."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _step_files(step_dir: epath.Path) -> list[str]:
    """Relative paths of every file of a step directory except the manifest, sorted."""
    out, todo = [], [step_dir]
    while todo:
        for path in todo.pop().iterdir():
            if path.is_dir():
                todo.append(path)
            else:
                rel = os.path.relpath(os.fspath(path), os.fspath(step_dir))
                if rel != MANIFEST_FILE:
                    out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str | epath.PathLike) -> None:
    """Write `MANIFEST_FILE` (size and SHA-256 of every file) into a committed step directory."""
    step_dir = epath.Path(step_dir)
    files = {}
    for rel in _step_files(step_dir):
        size, digest = _hash_file(step_dir / rel)
        files[rel] = {"size": size, "sha256": digest}
    payload = {"version": 1, "files": files}
    target = step_dir / MANIFEST_FILE
    if "://" in os.fspath(step_dir):  # remote storage: write then rename (atomic per object)
        tmp = step_dir / f".tmp_{MANIFEST_FILE}"
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.rename(target)
    else:
        write_json_atomic(os.fspath(target), payload)


def verify_files(step_dir: str | epath.PathLike) -> bool:
    """Check a step's files against its manifest; True if verified, False if it has no manifest.

    Raises `CheckpointCorruptError` naming the first damaged file (missing, other size, other
    content) or an unreadable manifest.
    """
    step_dir = epath.Path(step_dir)
    manifest = step_dir / MANIFEST_FILE
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointCorruptError(f"its manifest {manifest} is unreadable ({err})") from err
    for rel, expected in sorted(files.items()):
        path = step_dir / rel
        if not path.exists():
            raise CheckpointCorruptError(f"file {path} is missing")
        size, digest = _hash_file(path)
        if size != expected["size"]:
            raise CheckpointCorruptError(
                f"file {path} has {size} bytes, {expected['size']} were written (truncated?)"
            )
        if digest != expected["sha256"]:
            raise CheckpointCorruptError(f"file {path} differs from what was written (SHA-256)")
    return True


def read_integrity_record(step_dir: str | epath.PathLike) -> dict[str, Any] | None:
    """The step's array record ({path: {shape, dtype, checksum}}), or None for a step without one.

    Raises `CheckpointCorruptError` when the record exists but is unreadable.
    """
    path = epath.Path(step_dir) / INTEGRITY_ITEM / "metadata"
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text())["arrays"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointCorruptError(f"its array record {path} is unreadable ({err})") from err


def _is_data_read_error(err: BaseException) -> bool:
    """Whether a restore error is TensorStore failing to read or decode stored bytes."""
    text = f"{type(err).__name__}: {err}"
    return any(k in text for k in ("TensorStore", "DATA_LOSS", "Error reading", "decod"))


def checksum_differences(record: Mapping[str, Mapping[str, Any]], tree: PyTree) -> list[str]:
    """Paths of `tree` whose checksum differs from the record's (restored vs written arrays)."""
    now = array_checksums(tree)
    return [p for p in sorted(now) if p in record and record[p]["checksum"] != now[p]["checksum"]]


def check_checksums(record: Mapping[str, Mapping[str, Any]], tree: PyTree) -> None:
    """`CheckpointCorruptError` naming the paths (the first 8, and how many more) of `tree` whose
    checksum differs from the record's; nothing when every one matches."""
    bad = checksum_differences(record, tree)
    if bad:
        shown = ", ".join(bad[:8]) + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
        raise CheckpointCorruptError(f"checksum mismatch of {shown}")


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
        # Why only local paths: `epath`'s `absolute()` of a `gs://` path prepends the working
        # directory (`<cwd>/gs:/bucket/...`, a local folder named `gs:`); bucket paths are absolute.
        directory = epath.Path(directory)
        self.directory = directory.absolute() if is_local(directory) else directory
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_every,
                enable_async_checkpointing=async_save,
                create=True,
                # Why synchronous: with asynchronous creation a failed step directory leaves
                # orbax threads waiting 300 s for a signal at exit; now `save` raises at once.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            ),
            handler_registry=_handler_registry(),
        )
        self._pending: list[int] = []  # saved steps whose commit was not confirmed yet
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt_manifest")
        self._manifests: list[tuple[int, concurrent.futures.Future]] = []
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

    def step_dir(self, step: int) -> epath.Path:
        """The directory of step `step`."""
        return self.directory / str(int(step))

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
        self.check_errors()
        if step in self._manager.all_steps():
            return False
        record = {"version": 1, "arrays": array_checksums(state)}
        items = {
            STATE_ITEM: ocp.args.PyTreeSave(state),
            INTEGRITY_ITEM: ocp.args.JsonSave(record),
            **(extra or {}),
        }
        if data_iterator is not None:
            items[DATA_ITEM] = _data_save_args(data_iterator)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as err:
            self._manager.reload()
            raise CheckpointSaveError(
                f"saving checkpoint step {step} to {self.directory} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        if saved:
            self._pending.append(step)
        return saved

    def check_errors(self) -> None:
        """Raise `CheckpointSaveError` if a save finished and failed (cheap; poll it every
        logging interval). Confirms committed steps and starts writing their manifests."""
        if self._pending and not self._manager.is_saving_in_progress():
            self._confirm_pending()
        self._collect_manifests(block=False)

    def _confirm_pending(self) -> None:
        """Wait for the pending saves; raise `CheckpointSaveError` for one that did not commit."""
        steps, self._pending = self._pending, []
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            self._manager.reload()
            raise CheckpointSaveError(
                f"saving checkpoint step(s) {steps} to {self.directory} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        self._manager.reload()
        committed = set(self._manager.all_steps())
        for step in steps:
            rotated_out = any(c > step for c in committed)  # max_to_keep removed it
            if step not in committed and not rotated_out:
                self._manager.reload()
                raise CheckpointSaveError(
                    f"checkpoint step {step} in {self.directory} was not committed"
                )
            if jax.process_index() == 0 and self.step_dir(step).exists():
                future = self._hasher.submit(write_manifest, self.step_dir(step))
                self._manifests.append((step, future))

    def _collect_manifests(self, block: bool) -> None:
        """Raise `CheckpointSaveError` for a manifest that failed to be written."""
        still = []
        for step, future in self._manifests:
            if not block and not future.done():
                still.append((step, future))
                continue
            err = future.exception()
            if err is not None and self.step_dir(step).exists():  # a rotated-out step is fine
                self._manifests = still
                raise CheckpointSaveError(
                    f"writing the manifest of checkpoint step {step} in {self.directory} failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
        self._manifests = still

    def restore(
        self,
        step: int,
        abstract_state: PyTree,
        *,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
        data_iterator: Any = None,
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restore and verify step `step` into the structure/shapes/shardings of `abstract_state`.

        Returns (state, extras). With `data_iterator`, its state is restored in place when the step
        holds one for this process (then `extras["data"]` is the iterator); otherwise `extras` has
        no "data" key. Raises `CheckpointCorruptError` (files or checksums differ from what was
        written), `CheckpointMismatchError` (the arrays do not match `abstract_state`), or the
        restore's own error (files verified intact, or the step could not be verified).
        """
        step = int(step)
        step_dir = self.step_dir(step)
        # Why only process 0 reads the files: on a pod every host would read the whole step.
        damage, verified = None, True
        if jax.process_index() == 0:
            try:
                verified = verify_files(step_dir)
            except CheckpointCorruptError as err:
                damage = err
        if not _all_processes_agree(damage is None):
            raise damage or CheckpointCorruptError("its files are damaged (found by process 0)")
        verified = _all_processes_agree(verified)
        record = read_integrity_record(step_dir)
        if record is not None:
            differences = structure_differences(record, abstract_state)
            if differences:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {self.directory} does not match this run's train "
                    f"state (a config field that shapes the model or optimizer changed?): "
                    + "; ".join(differences)
                    + ". Nothing was moved: rerun with the config that wrote it, or use a new "
                    "workdir."
                )
        items = {STATE_ITEM: _restore_args(abstract_state), **(extra or {})}
        if data_iterator is not None:
            if data_state_file(step_dir).exists():
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
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            if not verified and record is not None and _is_data_read_error(err):
                # Why corruption: the arrays matched the target's structure (record checked above),
                # so a failure to read their bytes means damaged files.
                raise CheckpointCorruptError(f"its arrays cannot be read ({err})") from err
            how = (
                "its files are intact (manifest verified), so this is not corruption"
                if verified
                else "it has no manifest, so it cannot be told from corruption"
            )
            raise CheckpointError(
                f"restoring checkpoint step {step} of {self.directory} failed ({how}); nothing "
                f"was moved: {type(err).__name__}: {err}"
            ) from err
        state = restored[STATE_ITEM]
        if record is not None:
            check_checksums(record, state)
            if not verified and jax.process_index() == 0:
                write_manifest(step_dir)  # the commit happened but the manifest did not
        names = [k for k in items if k != STATE_ITEM]
        return state, {k: restored[k] for k in names}

    def restore_latest(
        self,
        abstract_state: PyTree,
        *,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
        data_iterator: Any = None,
    ) -> tuple[PyTree, int, dict[str, Any]] | None:
        """Restore the newest step that verifies; None if the directory holds no step.

        Corrupt newer steps (`CheckpointCorruptError`) are moved aside once an older step restored;
        any other error propagates with nothing moved; every step corrupt raises
        `NoRestorableCheckpointError` (nothing moved). With several processes the decision is
        taken jointly (a step is corrupt if it is on any process).
        """
        self.wait()
        corrupt: list[tuple[int, str]] = []
        steps = self.all_steps()
        for step in reversed(steps):
            reason, fatal = "", None
            try:
                state, extras = self.restore(
                    step, abstract_state, extra=extra, data_iterator=data_iterator
                )
            except CheckpointCorruptError as err:
                reason = str(err)
            except Exception as err:  # noqa: BLE001 - re-raised below, on every process
                fatal = err
            if not _all_processes_agree(fatal is None):
                raise fatal or CheckpointError(
                    f"restoring checkpoint step {step} of {self.directory} failed on another "
                    "process; nothing was moved"
                )
            if not _all_processes_agree(not reason):
                reason = reason or "corrupt on another process"
                logging.warning(
                    "Checkpoint step %d in %s is corrupt (%s); falling back to the previous step.",
                    step,
                    self.directory,
                    reason,
                )
                corrupt.append((step, reason))
                continue
            for bad_step, bad_reason in corrupt:
                self._quarantine(bad_step, bad_reason)
            return state, step, extras
        if corrupt:
            listing = "; ".join(f"step {s}: {r}" for s, r in corrupt)
            raise NoRestorableCheckpointError(
                f"no checkpoint step in {self.directory} restores ({listing}). Nothing was moved; "
                "move the directory aside to start from step 0."
            )
        return None

    def _quarantine(self, step: int, reason: str = "") -> None:
        """Move a corrupt step out of the manager's directory, to `<directory>.corrupt/<step>-<time>`.

        Only process 0 moves it; all processes then wait for each other and reload the step list.
        """
        if jax.process_index() == 0:
            target_root = epath.Path(str(self.directory) + ".corrupt")
            target_root.mkdir(parents=True, exist_ok=True)
            target = target_root / f"{step}-{int(time.time())}"
            self.step_dir(step).rename(target)
            logging.warning("Moved corrupt checkpoint step %d (%s) to %s.", step, reason, target)
        _sync(f"gmflow_quarantine_{step}")
        self._manager.reload()

    def move_all_aside(self, label: str = "restarted") -> epath.Path | None:
        """Move every step to `<directory>.<label>-<time>/` (an explicit restart from step 0).

        Returns the new location (None when there was no step). Process 0 moves; all wait.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            return None
        target_root = epath.Path(f"{self.directory}.{label}-{int(time.time())}")
        if jax.process_index() == 0:
            target_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                self.step_dir(step).rename(target_root / str(step))
            logging.warning(
                "Moved checkpoint steps %s of %s to %s.", steps, self.directory, target_root
            )
        _sync("gmflow_move_all_aside")
        self._manager.reload()
        return target_root

    def wait(self) -> None:
        """Block until pending saves are committed and their manifests written.

        Raises `CheckpointSaveError` if one failed.
        """
        self._confirm_pending()
        self._collect_manifests(block=True)

    def close(self) -> None:
        """Wait for pending saves, release the manager and restore the previous signal handlers.

        Everything is released even when a save failed; then `CheckpointSaveError` is raised.
        """
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as err:  # noqa: BLE001 - the save error above (if any) matters more
                logging.warning("Closing the checkpoint manager of %s: %s", self.directory, err)
            self._hasher.shutdown(wait=True)
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


def _weights_record(
    record: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> dict[str, Mapping[str, Any]]:
    """The entries of a state's array record under the fields `names`, keyed as the paths of a
    dict `{name: subtree}` (`['params']...`); the state's own paths are `.params...` for a
    dataclass state or `['params']...` for a dict state."""
    out = {}
    for path, entry in record.items():
        for name in names:
            for prefix in (f".{name}", f"[{name!r}]"):
                rest = path[len(prefix) :]
                if path.startswith(prefix) and (not rest or rest[0] in ".["):
                    out[f"[{name!r}]{rest}"] = entry
    return out


def _restore_weights_step(
    manager: ocp.CheckpointManager,
    directory: epath.Path,
    step: int,
    abstract_weights: dict[str, PyTree],
) -> PyTree:
    """Restore and verify the fields `abstract_weights` of one step (as `Checkpointer.restore`):
    files against the manifest, structure against the record, restored arrays' checksums."""
    step_dir = directory / str(step)
    damage = None
    if jax.process_index() == 0:  # as `Checkpointer.restore`: one host reads the files
        try:
            verify_files(step_dir)
        except CheckpointCorruptError as err:
            damage = err
    if not _all_processes_agree(damage is None):
        raise damage or CheckpointCorruptError("its files are damaged (found by process 0)")
    full_record = read_integrity_record(step_dir)
    record = None if full_record is None else _weights_record(full_record, list(abstract_weights))
    if record is not None:
        differences = structure_differences(record, abstract_weights)
        if differences:
            raise CheckpointMismatchError(
                f"restore_from: checkpoint step {step} in {directory} does not match this run's "
                f"{', '.join(abstract_weights)}: " + "; ".join(differences)
            )
    args = _restore_args(abstract_weights, partial=True)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))
    except Exception as err:
        if record is not None and _is_data_read_error(err):
            raise CheckpointCorruptError(f"its arrays cannot be read ({err})") from err
        raise
    weights = restored[STATE_ITEM]
    if record is not None:
        check_checksums(record, weights)
    return weights


def restore_weights(
    directory: str | epath.PathLike, abstract_weights: dict[str, PyTree], step: int | None = None
):
    """Restore only the named fields (e.g. params, ema_params) of another run's newest intact step
    (or of `step` alone when given: no fallback, a missing step raises naming the steps there).

    Returns (weights dict, step). The other run's directory is only read (nothing is moved or created);
    fields not named (optimizer state, step, rng) are ignored, so their structure may differ. Each
    step is verified as in `Checkpointer.restore` (files against the manifest, the named fields'
    arrays against the step's checksums): a corrupt step is skipped with a warning naming it and the
    previous one tried; every step corrupt raises `NoRestorableCheckpointError`; fields whose shapes
    differ raise `CheckpointMismatchError`.
    """
    directory = epath.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"restore_from directory {str(directory)!r} does not exist")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            create=False, read_only=True, save_interval_steps=0, max_to_keep=None
        ),
        handler_registry=_handler_registry(),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"restore_from={str(directory)!r} holds no checkpoint")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"step={step!r} is not a checkpoint step of {str(directory)!r}; its steps: "
                    f"{steps}"
                )
            return _restore_weights_step(manager, directory, int(step), abstract_weights), int(step)
        corrupt = []
        for step in reversed(steps):
            try:
                return _restore_weights_step(manager, directory, step, abstract_weights), step
            except CheckpointCorruptError as err:
                logging.warning(
                    "Checkpoint step %d in %s (restore_from) is corrupt (%s); trying the previous "
                    "step.",
                    step,
                    directory,
                    err,
                )
                corrupt.append(f"step {step}: {err}")
        raise NoRestorableCheckpointError(
            f"no checkpoint step in restore_from={str(directory)!r} restores intact ("
            + "; ".join(corrupt)
            + ")"
        )
    finally:
        manager.close()

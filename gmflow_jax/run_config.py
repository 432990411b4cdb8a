"""The run's resolved config, recorded in the workdir and compared on every rerun.

`check_run_config(config, workdir, has_checkpoints=...)` (called before step 0, after the workdir
lock is taken):

* no record yet: writes `RUN_CONFIG_FILE` (atomic JSON of the whole resolved config);
* a record: compares field by field. Fields of `ALLOWED_CHANGES` (training length, logging,
  checkpoint cadence, sampling, evaluation, mesh and process layout: nothing the trained weights
  depend on) may change; any other change (model, optimizer, EMA, loss, data, seed) raises
  `RunConfigMismatchError` listing every changed field with both values, unless the config asks
  for a restart (`checkpoint.restart=True`): then the caller moves the checkpoints aside
  (`Checkpointer.move_all_aside`) and trains from step 0. The record is rewritten after a pass;
* a damaged record is set aside (`<file>.damaged-<time>`) with a warning and replaced.

A workdir with checkpoints but no record (written before records existed) gets a record with a
warning: there is nothing to compare with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.paths import as_path, join, make_dirs

RUN_CONFIG_FILE = "run_config.json"
"""The resolved config of the run, in the workdir."""

ALLOWED_CHANGES = (
    "train.num_steps",
    "train.log_every",
    "train.max_consecutive_skips",
    "checkpoint.every_steps",
    "checkpoint.max_to_keep",
    "checkpoint.async_save",
    "checkpoint.restore_from",  # read only when a run starts from scratch
    "checkpoint.restart",
    "sample",
    "eval",
    "mesh",  # restores reshard onto any mesh
    "distributed",
    "model.remat",  # memory only: the same function
    "model.remat_policy",  # memory only: what the backward pass recomputes
    "data.path",  # the same prepared data may move; its index is checked when opened
    "data.include_ids",
)
"""Dotted fields (or whole sections) that may differ between a run and its rerun."""


class RunConfigMismatchError(ValueError):
    """The rerun's config changes fields that the checkpoints depend on."""


def _plain(value: Any) -> Any:
    """JSON-comparable form: tuples as lists, ConfigDicts as dicts, recursively."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {str(k): _plain(v) for k, v in dict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as plain JSON data (field references resolved)."""
    return _plain(config.to_dict())


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested record."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _allowed(field: str) -> bool:
    """Whether `field` is (inside) one of `ALLOWED_CHANGES`."""
    return any(field == a or field.startswith(a + ".") for a in ALLOWED_CHANGES)


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every leaf that differs; a missing side is `<absent>`."""
    a, b = flatten(old), flatten(new)
    missing = "<absent>"
    return [
        (f, a.get(f, missing), b.get(f, missing))
        for f in sorted(set(a) | set(b))
        if a.get(f, missing) != b.get(f, missing)
    ]


def restart_requested(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks to train from step 0 in a workdir that holds checkpoints."""
    checkpoint = config.get("checkpoint")
    return bool(checkpoint is not None and checkpoint.get("restart", False))


def _read_record(path: str) -> dict[str, Any] | None:
    """The recorded config, or None (missing; a damaged file is set aside with a warning)."""
    source = as_path(path)  # local or gs:// (the path layer)
    if not source.exists():
        return None
    try:
        record = json.loads(source.read_bytes().decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        aside = f"{path}.damaged-{int(time.time())}"
        source.rename(as_path(aside))
        logging.warning("Run config record %s is damaged (%s); moved to %s.", path, err, aside)
        return None


def check_run_config(
    config: ml_collections.ConfigDict, workdir: str, *, has_checkpoints: bool, write: bool = True
) -> list[tuple[str, Any, Any]]:
    """Compare `config` with the workdir's record, then record it; returns the changed fields.

    Raises `RunConfigMismatchError` (one message, every refused field with both values) when a
    field outside `ALLOWED_CHANGES` changed, checkpoints exist and no restart was requested.
    `write=False` on processes other than 0.
    """
    path = join(workdir, RUN_CONFIG_FILE)
    new = config_record(config)
    old = _read_record(path)
    changes = [] if old is None else config_differences(old, new)
    refused = [c for c in changes if not _allowed(c[0])]
    if old is None and has_checkpoints:
        logging.warning(
            "Workdir %s holds checkpoints but no %s: the config cannot be compared with the one "
            "that wrote them; recording this one.",
            workdir,
            RUN_CONFIG_FILE,
        )
    if refused and has_checkpoints and not restart_requested(config):
        lines = "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in refused)
        raise RunConfigMismatchError(
            f"the config differs from the one that wrote the checkpoints in {workdir} in "
            f"{len(refused)} field(s) that change the model, optimizer, data or loss: {lines}. "
            "Rerun with the recorded config (see run_config.json), use a new --workdir, or pass "
            "--config.checkpoint.restart=True to move the checkpoints aside and train from step 0."
        )
    if write:
        make_dirs(workdir)
        write_json_atomic(path, new)
    return changes

"""Atomic file writes, local or on an object store (`gs://`), through the path layer
(`gmflow_jax.paths`, etils `epath`).

* Local paths: a temporary file in the target's directory, fsync, then `os.replace`.
* Other filesystems (`gs://` and any `epath` backend): the bytes are produced in memory and stored with
  one write; an object store makes one upload visible all at once, so readers again see the previous
  object or the complete new one.

Every JSON, npz and PNG file the project writes (metrics, train logs, latent indices, sample shards,
caches, figures, converted weights) goes through `write_atomic`, so a reader sees either the previous
file or the complete new one, never a half-written file, even when the writer is killed (preemption,
SIGKILL); on any error in `write` nothing is stored. ArrayRecord shards and memory-mapped `.npy`
files, whose writers open a local path themselves, are written under a temporary name and renamed
in place (`data/latents.py`, `tools/prepare_imagenet_latents.py`); checkpoints are orbax's (atomic
by its own commit protocol, also on `gs://`).

Reading back: `read_json_or_set_aside` returns a default for a damaged JSON file (train log, cache)
after renaming it to `<name>.damaged.<timestamp>` with a warning (`set_aside`), so a damaged file is
rebuilt instead of blocking every rerun.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
from absl import logging

from gmflow_jax.paths import PathLike, as_path, is_local


def _process_umask() -> int:
    """The process umask, read once at import (reading it means setting it; not thread-safe later)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _process_umask()

TMP_PREFIX = ".tmp_"
"""Name prefix of the temporary files (hidden; never matches a reader's glob of real outputs)."""


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None], suffix: str = "") -> None:
    """Call `write(f)` on a binary file object and store what it wrote at `path` atomically.

    Readers see either the old file or the complete new one; on any error nothing is stored (a
    local temporary file is removed) and the error re-raised. Local files get ordinary
    permissions (0644 less the umask). `path` may be any `gmflow_jax.paths` path (e.g. `gs://`).
    """
    if not is_local(path):
        # Why a buffer: an object store has no rename; one upload of the whole object is atomic.
        buffer = io.BytesIO()
        write(buffer)
        as_path(path).write_bytes(buffer.getvalue())
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_UMASK)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def json_safe(value: Any) -> Any:
    """`value` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json_atomic(path: PathLike, payload: Any, sort_keys: bool = False) -> None:
    """Write `payload` as strict, indented JSON to `path` atomically; non-finite floats become null."""
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False, sort_keys=sort_keys)
    write_atomic(path, lambda f: f.write(text.encode()), ".json")


def write_npz_atomic(path: PathLike, *arrays: Any, **named: Any) -> None:
    """`np.savez(path, *arrays, **named)` (uncompressed; `arr_0`, ... for positional arrays),
    atomically; `path` is used as given (no ".npz" is appended)."""
    write_atomic(path, lambda f: np.savez(f, *arrays, **named), ".npz")


DAMAGED_INFIX = ".damaged."
"""A damaged file `<name>` is set aside as `<name>.damaged.<UTC timestamp>`."""


def set_aside(path: PathLike, reason: str) -> str:
    """Rename the damaged file `path` to `<path>.damaged.<UTC timestamp>` with a logged warning.

    Returns the new path. Why rename rather than delete: the damaged bytes stay for inspection, and
    the next writer finds the name free. Two files set aside in the same second get `-1`, `-2`, ...
    """
    source = as_path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = as_path(f"{os.fspath(path)}{DAMAGED_INFIX}{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = as_path(f"{os.fspath(path)}{DAMAGED_INFIX}{stamp}-{n}")
    source.rename(target)
    logging.warning(
        "Set aside damaged file %s as %s (%s); it will be rebuilt.", path, target, reason
    )
    return os.fspath(target)


def read_json_or_set_aside(path: PathLike, default: Any) -> Any:
    """The parsed JSON file `path`; `default` when it is absent or damaged.

    A damaged file (not UTF-8, not JSON: e.g. truncated by a full disk or a copy) is set aside with
    a warning (`set_aside`) so that the caller rebuilds it instead of failing on every rerun.
    """
    source = as_path(path)
    if not source.exists():
        return default
    try:
        return json.loads(source.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        set_aside(path, f"not valid JSON: {err}")
        return default

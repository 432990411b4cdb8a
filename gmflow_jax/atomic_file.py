"""Atomic file writes: a temporary file in the target's directory, fsync, then `os.replace`.

Every JSON, npz and PNG file the project writes (metrics, train logs, latent indices, sample shards,
caches, figures, converted weights) goes through `write_atomic`, so a reader sees either the previous file or the
complete new one, never a half-written file, even when the writer is killed (preemption, SIGKILL).
ArrayRecord shards and memory-mapped `.npy` files, whose writers open a path themselves, are written
under a temporary name and renamed in place (`data/latents.py`, `tools/prepare_imagenet_latents.py`);
checkpoints are orbax's (atomic by its own commit protocol).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np


def _process_umask() -> int:
    """The process umask, read once at import (reading it means setting it; not thread-safe later)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _process_umask()

TMP_PREFIX = ".tmp_"
"""Name prefix of the temporary files (hidden; never matches a reader's glob of real outputs)."""


def write_atomic(path: str, write: Callable[[BinaryIO], None], suffix: str = "") -> None:
    """Call `write(f)` on a temporary binary file next to `path`, then move it onto `path`.

    Readers see either the old file or the complete new one; on any error the temporary file is
    removed and the error re-raised. The file gets ordinary permissions (0644 less the umask).
    """
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


def write_json_atomic(path: str, payload: Any, sort_keys: bool = False) -> None:
    """Write `payload` as strict, indented JSON to `path` atomically; non-finite floats become null."""
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False, sort_keys=sort_keys)
    write_atomic(path, lambda f: f.write(text.encode()), ".json")


def write_npz_atomic(path: str, *arrays: Any, **named: Any) -> None:
    """`np.savez(path, *arrays, **named)` (uncompressed; `arr_0`, ... for positional arrays),
    atomically; `path` is used as given (no ".npz" is appended)."""
    write_atomic(path, lambda f: np.savez(f, *arrays, **named), ".npz")

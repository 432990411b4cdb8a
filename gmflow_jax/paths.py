"""The one path layer of the project: local paths and `gs://` (any etils `epath` filesystem) alike.

Every file a run writes into or reads from its workdir (config.json, train_log.json, metrics.json,
figures, TensorBoard, sample shards, converted weights) is named through this module, so a workdir
may be a local directory or a bucket (`gs://bucket/run`): `etils.epath` (what orbax already uses for
checkpoints) picks the backend from the path's scheme (fsspec/gcsfs or TensorFlow's gfile for
`gs://`, `os` for local paths). `os.path` / `os.makedirs` on a `gs://` string silently create a
local directory named `gs:`; these functions never do.

==============  =========================================================================
name            what it is
==============  =========================================================================
`as_path`       an `epath.Path` for a str / os.PathLike / epath.Path
`is_local`      whether a path is on the local filesystem (no `scheme://`)
`join`          `base / parts` as a string, with `gs://` kept intact
`make_dirs`     create a directory and its parents (a no-op on object stores' prefixes)
`copy_tree`     copy a directory's files to another directory, local or not
==============  =========================================================================

Atomic writes: `gmflow_jax.atomic_file` (temp file + rename locally; one object upload, atomic by
itself, on an object store).
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike | epath.Path


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path` (its scheme picks the filesystem)."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if not text:
        raise ValueError("path must be non-empty")
    return epath.Path(text)


def is_local(path: PathLike) -> bool:
    """Whether `path` is on the local filesystem (it has no `scheme://` prefix)."""
    return "://" not in os.fspath(path)


def join(base: PathLike, *parts: Any) -> str:
    """`base` joined with `parts`, as a string (`gs://b/run` + `x.json` -> `gs://b/run/x.json`)."""
    return os.fspath(as_path(base).joinpath(*(os.fspath(p) for p in parts)))


def make_dirs(path: PathLike) -> epath.Path:
    """Create directory `path` and its parents if missing; returns it as an `epath.Path`."""
    p = as_path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def copy_tree(source: PathLike, target: PathLike) -> list[str]:
    """Copy every file under directory `source` to the same relative path under `target` (either
    may be local or not); returns the target files written, sorted. Each file is one write
    (`write_bytes`: one upload on an object store), so a reader never sees a partial file there.

    Why: tools that write a directory through their own file API (the JAX profiler, converters
    that stage a folder) write locally; this puts the result into a `gs://` workdir.
    """
    source, target = as_path(source), as_path(target)
    if not source.is_dir():
        raise NotADirectoryError(f"copy_tree source {os.fspath(source)} is not a directory")
    written = []
    # Why `iterdir` recursion: epath refuses recursive globs (`**`), one RPC per match on GCS.
    for path in sorted(source.iterdir()):
        if path.is_dir():
            written += copy_tree(path, target / path.name)
        else:
            make_dirs(target)
            (target / path.name).write_bytes(path.read_bytes())
            written.append(os.fspath(target / path.name))
    return sorted(written)

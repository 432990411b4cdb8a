"""Writing a whole folder atomically: stage it beside the target, then rename it into place.

`replace_folder(out_dir, write, replaceable=..., what=...)`, the writer of every converted weights
folder (`gmflow_jax.interop.converted_folder`):

1. Before any work: a path that exists and is not a folder is refused, and so is an existing
   non-empty folder that `replaceable(out_dir)` does not accept (so a mistyped `--out_dir` never
   deletes a folder that is not an earlier output of the same converter).
2. `write(stage)` fills a fresh hidden folder `.tmp_<name>.<random>` beside `out_dir` (the same
   filesystem, so the renames below are atomic). On any error the stage is deleted and the error
   re-raised; `out_dir` has not been touched.
3. No old folder: the stage is renamed to `out_dir`. An old folder: it is renamed aside to
   `.old_<name>.<random>`, the stage renamed to `out_dir`, then the old folder deleted; if the
   second rename fails the old folder is renamed back before the error is re-raised.

Local folders only: a non-local `out_dir` (`gs://...`) is refused before any work with a one-line
error (`refuse_non_local`). Why not write-then-copy: the converted folder is read back with local
file APIs (SHA-256 manifest, `np.load` of memory-sized files, `os.path.realpath` containment
checks), an object store has no rename, and an uploaded copy could not replace an earlier folder
atomically; convert to a local folder and copy it (`gcloud storage cp -r`) if a bucket must hold it.

A reader therefore sees the old folder or the complete new one. The one gap is a kill between the
two renames of step 3 (two system calls): `out_dir` is then absent and both folders sit beside it
under their hidden names. A kill during step 2 leaves a `.tmp_*` folder behind; it is never read.
The parent directory is fsynced after the renames so they survive a power cut.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from typing import TypeVar

from gmflow_jax.paths import is_local

T = TypeVar("T")

STAGE_PREFIX = ".tmp_"
"""Name prefix of the staging folder (hidden, beside the target)."""

OLD_PREFIX = ".old_"
"""Name prefix of the replaced folder between the two renames (deleted right after)."""


def _fresh_sibling(parent: str, prefix: str, name: str) -> str:
    """A new empty folder `parent/<prefix><name>.<random hex>` (created with the umask's mode)."""
    while True:
        path = os.path.join(parent, f"{prefix}{name}.{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _unused_sibling(parent: str, prefix: str, name: str) -> str:
    """A path `parent/<prefix><name>.<random hex>` that does not exist (a rename target)."""
    while True:
        path = os.path.join(parent, f"{prefix}{name}.{secrets.token_hex(4)}")
        if not os.path.lexists(path):
            return path


def _fsync_dir(path: str) -> None:
    """Make the renames inside directory `path` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_non_local(out_dir: str) -> None:
    """Raise ValueError (one line) when `out_dir` is not a local path (module docstring)."""
    if not is_local(out_dir):
        raise ValueError(
            f"out_dir={out_dir!r} is not a local path: converted folders are written and read "
            "locally (staged, then renamed); convert to a local folder, then copy it to the bucket"
        )


def check_replaceable(out_dir: str, replaceable: Callable[[str], bool], what: str) -> None:
    """Raise unless `out_dir` is local and absent, an empty folder, or a folder `replaceable`
    accepts."""
    refuse_non_local(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise FileExistsError(
            f"out_dir={out_dir!r} exists and is not a folder; choose another path or remove it"
        )
    if os.listdir(out_dir) and not replaceable(out_dir):
        raise FileExistsError(
            f"out_dir={out_dir!r} is a non-empty folder that is not a {what}; refusing to replace "
            "it: choose a new path, or delete it yourself"
        )


def replace_folder(
    out_dir: str,
    write: Callable[[str], T],
    *,
    replaceable: Callable[[str], bool],
    what: str,
) -> T:
    """Fill a staged folder with `write(stage)` and rename it to `out_dir` (module docstring).

    `replaceable(path)` says whether an existing non-empty folder may be replaced (an earlier
    output of the same writer); `what` names that kind of folder in the refusal. Returns what
    `write` returns.
    """
    refuse_non_local(out_dir)  # before `abspath`, which makes `gs://b/x` a local `<cwd>/gs:/b/x`
    out_dir = os.path.abspath(out_dir)
    check_replaceable(out_dir, replaceable, what)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = _fresh_sibling(parent, STAGE_PREFIX, name)
    try:
        result = write(stage)
        _fsync_dir(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not os.path.lexists(out_dir):
        try:
            os.rename(stage, out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        _fsync_dir(parent)
        return result
    old = _unused_sibling(parent, OLD_PREFIX, name)
    try:
        os.rename(out_dir, old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        os.rename(stage, out_dir)
    except BaseException:
        # Why: the new folder could not take the old one's place; put the old one back.
        os.rename(old, out_dir)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(parent)
    try:
        shutil.rmtree(old)
    except OSError as err:
        warnings.warn(
            f"{out_dir!r} was replaced, but the old folder {old!r} could not be deleted ({err}); "
            "delete it yourself",
            stacklevel=2,
        )
    return result

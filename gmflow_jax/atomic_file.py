"""Atomic file writes: a temporary file in the target's directory, fsync, then `os.replace`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def write_atomic(path: str, write: Callable[[BinaryIO], None], suffix: str = "") -> None:
    """Call `write(f)` on a temporary binary file next to `path`, then move it onto `path`.

    Readers see either the old file or the complete new one; on any error the temporary file is
    removed and the error re-raised.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

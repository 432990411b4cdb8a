"""TensorBoard event files in any workdir of the path layer (`gmflow_jax.paths`): local or `gs://`.

`summary_writer(logdir)` is a tensorboardX `SummaryWriter` whose event file lands in `logdir`
wherever that is, so `tensorboard --logdir gs://bucket/run/tensorboard` (as with MaxText or
big_vision) shows a run whose workdir is a bucket.

Why not tensorboardX's own `gs://` writer: it needs `google-cloud-storage`, a second GCS client
beside the one the path layer (etils `epath`: gcsfs or TensorFlow's gfile) and orbax already use,
and it cannot be pointed at another filesystem (a test's in-memory bucket). For a non-local logdir,
tensorboardX's writer registry (`record_writer.register_writer_factory`) is given a factory for the
logdir's scheme whose files go through the path layer: the event records are kept in memory and the
whole object is uploaded on every flush (tensorboardX flushes every `flush_secs` and on `flush()` /
`close()`). An object store has no append; one upload of the whole object is atomic, so a reader
sees the previous flush or this one, never a torn record. This is what TensorFlow's GCS filesystem
and tensorboardX's GCS writer do too; the cost is one upload of the event file per flush (a few
MB for a long run's scalars, more with many images). The registration is process-wide for that
scheme (it replaces tensorboardX's google-cloud-storage writer in this process).

Local logdirs use tensorboardX unchanged (appends to a local file).
"""

from __future__ import annotations

import io
import os
import threading

from tensorboardX import SummaryWriter, record_writer

from gmflow_jax.paths import PathLike, as_path, is_local, make_dirs


class PathEventFile:
    """A write-only binary file on a path-layer filesystem: `write` appends in memory, `flush` and
    `close` store everything written so far as the object `path` (one upload)."""

    def __init__(self, path: PathLike):
        self.path = as_path(path)
        self._buffer = io.BytesIO()
        self._stored = -1  # bytes in the stored object; -1: nothing stored yet
        self._lock = threading.Lock()  # tensorboardX flushes from its own thread

    def write(self, data: bytes) -> int:
        with self._lock:
            return self._buffer.write(data)

    def flush(self) -> None:
        with self._lock:
            size = self._buffer.tell()
            if size == self._stored:
                return  # nothing new: no upload
            self.path.write_bytes(self._buffer.getvalue())
            self._stored = size

    def close(self) -> None:
        self.flush()


class PathEventFileFactory:
    """tensorboardX writer factory (`record_writer.register_writer_factory`) over the path layer."""

    def open(self, path: str) -> PathEventFile:
        return PathEventFile(path)

    def directory_check(self, path: str) -> None:
        make_dirs(path)


def summary_writer(logdir: PathLike, **kwargs) -> SummaryWriter:
    """A tensorboardX `SummaryWriter` on `logdir` (local or any path-layer scheme, e.g. `gs://`);
    `kwargs` go to `SummaryWriter` (e.g. `flush_secs`)."""
    logdir = os.fspath(logdir)
    if not is_local(logdir):
        # tensorboardX picks the factory by the text before the first ':' of the file path.
        record_writer.register_writer_factory(logdir.split(":", 1)[0], PathEventFileFactory())
    return SummaryWriter(logdir, **kwargs)

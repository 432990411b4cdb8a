"""An in-memory `gs://` filesystem behind the path layer (etils `epath`), for tests.

`epath` sends `gs://` paths to its fsspec backend; `use_memory_bucket` gives that backend fsspec's
in-memory filesystem instead of GCS, so every byte goes through the same `epath` code a real bucket
does and nothing reaches the network or the local disk. Object keys keep the `gs://` prefix
(`"gs://bucket/run/metrics.json"`).

What it cannot serve: TensorStore's own `gcs` kvstore driver (orbax's array data on `gs://`), which
talks HTTP to GCS from C++ and never calls `epath`.
"""

from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem


def use_memory_bucket(monkeypatch) -> MemoryFileSystem:
    """Route every `gs://` path of `epath` to an emptied in-memory filesystem (undone by
    `monkeypatch`); returns it (its `store` maps keys to files)."""
    memory = MemoryFileSystem()
    memory.store.clear()
    memory.pseudo_dirs.clear()
    memory.pseudo_dirs.append("")
    monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", lambda self, path: memory)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    return memory

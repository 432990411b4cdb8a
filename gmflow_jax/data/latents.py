"""ImageNet VAE latents (`docs/math.md` §4.8) in ArrayRecord shards, read by a deterministic, checkpointable grain loader.

On-disk format (written by `tools/prepare_imagenet_latents.py`): a directory with

* `index.json`: `{"format": FORMAT, "num_examples": N, "latent_shape": [H, W, C], "dtype": "float32" |
  "bfloat16", "num_classes": K, "shards": [{"file", "num_records", "first_id"}, ...], ...}`; shard files
  are listed in example-id order, shard j holding ids `first_id .. first_id + num_records - 1`;
* the shard files, ArrayRecord (`group_size:1`, so every record is randomly accessible), one record per
  example: `RECORD_HEADER` (little-endian int64 label, int64 example id) followed by the latent's raw
  bytes, C order, shape `latent_shape`, dtype `dtype`.

The loader (`latent_dataset`):

* the global example order is one stream of epochs: position p is record
  `grain.MapDataset.range(N).shuffle(seed).repeat()[p]`, a fresh global permutation every epoch (grain
  reseeds each epoch), so within an epoch every example appears exactly once;
* global batch s is stream positions [s B, (s + 1) B) (a batch may straddle two epochs);
* this process reads only its rows of each global batch: explicit global row indices `rows` (on a
  mesh `parallel.sharding.process_rows(mesh, B)`, the rows this host's devices hold, in however many
  blocks the device layout gives), else rows [i B/P, (i + 1) B/P) for shard index i of P
  (`grain.sharding.ShardByJaxProcess`). The global batch is therefore the same for any number of
  processes and any layout, and a run may resume on a different number of hosts;
* element s of the dataset is this process's part of global batch s, its rows in the order of `rows`,
  a dict of numpy arrays `{"x0": [R, H, W, C] float32, "labels": [R] int32}` (+ `"ids"` [R] int64 with
  `include_ids`), R = len(rows).

The iterator (`make_iterator`, threads only: decoding is a copy, so worker processes do not pay) is a
grain `DatasetIterator` whose state is `{"next_index": s}`, the next global step, identical on every
process. It is saved with each checkpoint (`gmflow_jax.checkpoint`, item "data") and `seek(it, step)`
positions it from a restored step when no saved state applies.

==============================  ==================================================================
name                            what it is
==============================  ==================================================================
`encode_record`, `decode_record`  one example <-> the bytes of one ArrayRecord record
`write_shard`                   write records to an ArrayRecord file atomically (temp + rename)
`write_index`, `read_index`     the directory's `index.json`
`LatentShards`, `open_latent_shards`  the checked shard set of a directory
`latent_dataset`                grain MapDataset of this process's rows of each global batch
`make_iterator`, `seek`         the checkpointable iterator from a step
==============================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np

from gmflow_jax.atomic_file import write_json_atomic

FORMAT = "gmflow_latents/1"
"""Format tag written to and required in `index.json`."""

INDEX_FILE = "index.json"
"""Name of the index file inside a latents directory."""

RECORD_HEADER = struct.Struct("<qq")
"""Record header: label, example id (little-endian int64 each); the latent bytes follow."""

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
"""Stored latent dtypes by name."""

WRITER_OPTIONS = "group_size:1"
"""ArrayRecord writer options: one record per chunk, for random access."""


def _dtype_name(dtype: Any) -> str:
    """The `DTYPES` name of `dtype`; ValueError for any other."""
    dtype = np.dtype(dtype)
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"latent dtype must be one of {sorted(DTYPES)}, got {dtype}")


def encode_record(latent: np.ndarray, label: int, example_id: int) -> bytes:
    """The bytes of one record: header (label, example id) then the latent's raw C-order bytes."""
    latent = np.ascontiguousarray(latent)
    _dtype_name(latent.dtype)
    return RECORD_HEADER.pack(int(label), int(example_id)) + latent.tobytes()


def decode_record(
    record: bytes, latent_shape: Sequence[int], dtype: Any
) -> tuple[np.ndarray, int, int]:
    """(latent, label, example id) of one record; ValueError when its length does not match."""
    dtype = np.dtype(dtype)
    expected = RECORD_HEADER.size + int(np.prod(latent_shape)) * dtype.itemsize
    if len(record) != expected:
        raise ValueError(
            f"record has {len(record)} bytes, expected {expected} for a {tuple(latent_shape)} "
            f"{dtype.name} latent"
        )
    label, example_id = RECORD_HEADER.unpack_from(record)
    latent = np.frombuffer(record, dtype, offset=RECORD_HEADER.size).reshape(latent_shape)
    return latent, label, example_id


def write_shard(path: str, records: Sequence[bytes]) -> int:
    """Write `records` to the ArrayRecord file `path` atomically; returns the record count.

    The file is written under a temporary name in the same directory and renamed when complete, so a
    file at `path` is always whole.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
    os.replace(tmp, path)
    return len(records)


def write_index(
    directory: str,
    shards: Sequence[dict[str, Any]],
    latent_shape: Sequence[int],
    dtype: Any,
    num_classes: int,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `index.json` (atomically) for `shards` (dicts with file, num_records, first_id)."""
    payload = {
        "format": FORMAT,
        "num_examples": int(sum(s["num_records"] for s in shards)),
        "latent_shape": [int(d) for d in latent_shape],
        "dtype": _dtype_name(dtype),
        "num_classes": int(num_classes),
        "shards": [
            {
                "file": s["file"],
                "num_records": int(s["num_records"]),
                "first_id": int(s["first_id"]),
            }
            for s in shards
        ],
        **(extra or {}),
    }
    path = os.path.join(directory, INDEX_FILE)
    write_json_atomic(path, payload)
    return path


def read_index(directory: str) -> dict[str, Any]:
    """The parsed `index.json` of `directory`; FileNotFoundError naming the preparation tool."""
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {INDEX_FILE} in {directory!r}: prepare the latents with "
            "`python tools/prepare_imagenet_latents.py --output_dir=<dir> ...`"
        )
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}")
    return index


@dataclasses.dataclass(frozen=True)
class LatentShards:
    """A checked set of latent shards: file paths in id order, sizes, latent shape and dtype."""

    directory: str
    paths: tuple[str, ...]
    num_examples: int
    latent_shape: tuple[int, ...]
    dtype: np.dtype
    num_classes: int
    index: dict[str, Any]


def open_latent_shards(directory: str) -> LatentShards:
    """The shards listed in `directory/index.json`, checked to exist with the listed record counts."""
    from array_record.python.array_record_module import ArrayRecordReader

    index = read_index(directory)
    paths, first = [], 0
    for shard in index["shards"]:
        path = os.path.join(directory, shard["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path!r} listed in {INDEX_FILE} is missing")
        if shard["first_id"] != first:
            raise ValueError(f"shard {path!r} starts at id {shard['first_id']}, expected {first}")
        reader = ArrayRecordReader(path)
        try:
            count = reader.num_records()
        finally:
            reader.close()
        if count != shard["num_records"]:
            raise ValueError(
                f"shard {path!r} holds {count} records, {INDEX_FILE} says {shard['num_records']}"
            )
        paths.append(path)
        first += count
    if first != index["num_examples"] or first < 1:
        raise ValueError(
            f"{INDEX_FILE} lists {first} records in shards, num_examples={index['num_examples']}"
        )
    return LatentShards(
        directory=directory,
        paths=tuple(paths),
        num_examples=first,
        latent_shape=tuple(index["latent_shape"]),
        dtype=DTYPES[index["dtype"]],
        num_classes=int(index["num_classes"]),
        index=index,
    )


class _ReadRows:
    """Map function: global step s -> this process's rows of global batch s, decoded."""

    def __init__(
        self,
        shards: LatentShards,
        order: grain.MapDataset,
        global_batch_size: int,
        rows: np.ndarray,
        include_ids: bool,
        out_dtype: np.dtype,
    ):
        self.paths = shards.paths
        self.latent_shape = shards.latent_shape
        self.dtype = shards.dtype
        self.order = order
        self.global_batch_size = global_batch_size
        self.rows = rows
        self.include_ids = include_ids
        self.out_dtype = out_dtype
        self._source = None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """Read and decode rows `self.rows` of global batch `step`."""
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(list(self.paths))
        base = int(step) * self.global_batch_size
        keys = [self.order[base + int(r)] for r in self.rows]
        records = self._source.__getitems__(keys)
        n = len(keys)
        x0 = np.empty((n, *self.latent_shape), self.out_dtype)
        labels = np.empty((n,), np.int32)
        ids = np.empty((n,), np.int64)
        for i, record in enumerate(records):
            latent, labels[i], ids[i] = decode_record(record, self.latent_shape, self.dtype)
            x0[i] = latent
        batch = {"x0": x0, "labels": labels}
        if self.include_ids:
            batch["ids"] = ids
        return batch


def _check_rows(rows: Any, global_batch_size: int) -> np.ndarray:
    """`rows` as an int64 array of distinct indices in [0, global_batch_size); ValueError otherwise."""
    array = np.asarray(rows)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"rows must be a non-empty 1-D sequence of integers, got {rows!r}")
    array = array.astype(np.int64)
    if array.min() < 0 or array.max() >= global_batch_size:
        raise ValueError(
            f"rows must lie in [0, {global_batch_size}), got min {array.min()} max {array.max()}"
        )
    if np.unique(array).size != array.size:
        raise ValueError("rows must be distinct: a repeated row would be read twice")
    return array


def latent_dataset(
    shards: LatentShards,
    *,
    global_batch_size: int,
    seed: int,
    shard_options: grain.sharding.ShardOptions | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    num_epochs: int | None = None,
    include_ids: bool = False,
    out_dtype: Any = np.float32,
) -> grain.MapDataset:
    """Grain MapDataset whose element s is this process's rows of global batch s (module docstring).

    Rows: `rows` (global row indices of each batch, distinct, any number of blocks; e.g.
    `parallel.sharding.process_rows(mesh, global_batch_size)`) if given, else the `shard_options`
    block (default `grain.sharding.ShardByJaxProcess()`). `num_epochs=None` repeats forever; otherwise the dataset
    ends after the last full global batch of `num_epochs` epochs.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if rows is None:
        opts = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
        if global_batch_size % opts.shard_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be divisible by the "
                f"{opts.shard_count} shards (processes)"
            )
        local = global_batch_size // opts.shard_count
        rows = np.arange(opts.shard_index * local, (opts.shard_index + 1) * local)
    rows = _check_rows(rows, global_batch_size)
    order = grain.MapDataset.range(shards.num_examples).shuffle(seed=seed).repeat(num_epochs)
    num_steps = len(order) // global_batch_size
    if num_steps < 1:
        raise ValueError(f"{len(order)} examples make no full global batch of {global_batch_size}")
    reader = _ReadRows(shards, order, global_batch_size, rows, include_ids, np.dtype(out_dtype))
    return grain.MapDataset.range(num_steps).map(reader)


def make_iterator(
    dataset: grain.MapDataset, start_step: int = 0, *, prefetch: int = 2
) -> grain.DatasetIterator:
    """The checkpointable iterator over `dataset` positioned at global step `start_step`.

    Reads `prefetch` batches ahead, one thread each (grain `ReadOptions`); 0 reads in the caller's
    thread. Its state is `{"next_index": step}`.
    """
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    iterator = iter(dataset.to_iter_dataset(options))
    seek(iterator, start_step)
    return iterator


def iterator_step(iterator: grain.DatasetIterator) -> int:
    """The global step of the batch `next(iterator)` returns."""
    return int(iterator.get_state()["next_index"])


def seek(iterator: grain.DatasetIterator, step: int) -> None:
    """Position `iterator` so that its next batch is global batch `step`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if iterator_step(iterator) != step:
        iterator.set_state({"next_index": int(step)})

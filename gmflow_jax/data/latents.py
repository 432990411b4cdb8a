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

Bad data is never skipped: every decoded batch is checked, and a record whose label is outside
[0, num_classes) (num_classes itself is the null label of classifier-free guidance, never a data
label), whose latent has a NaN or inf, or whose example id is not its position in the index stops
the run with a `LatentDataError` naming the shard file and the example id. A truncated or otherwise
unreadable shard is named with its path (`open_latent_shards`, and again when a read fails later).
`LatentShards.check_num_classes` compares the index's class count with the model's.

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
`LatentDataError`               a damaged shard or a bad record, named by file and example id
`LatentShards.check_num_classes`  the index's class count against the model's
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
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

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


class LatentDataError(ValueError):
    """A shard that cannot be read, or a record that must not be trained on (message names both)."""


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
    record: bytes,
    latent_shape: Sequence[int],
    dtype: Any,
    *,
    num_classes: int | None = None,
    shard: str = "",
) -> tuple[np.ndarray, int, int]:
    """(latent, label, example id) of one record; `LatentDataError` when its length does not match.

    With `num_classes`, the record is also checked (`check_example`): label in [0, num_classes),
    latent finite. `shard` names the file in the errors.
    """
    dtype = np.dtype(dtype)
    expected = RECORD_HEADER.size + int(np.prod(latent_shape)) * dtype.itemsize
    if len(record) != expected:
        where = f" in shard {shard}" if shard else ""
        raise LatentDataError(
            f"record{where} has {len(record)} bytes, expected {expected} for a "
            f"{tuple(latent_shape)} {dtype.name} latent"
        )
    label, example_id = RECORD_HEADER.unpack_from(record)
    latent = np.frombuffer(record, dtype, offset=RECORD_HEADER.size).reshape(latent_shape)
    if num_classes is not None:
        check_example(latent, label, example_id, num_classes, shard)
    return latent, label, example_id


def _label_error(label: int, example_id: int, num_classes: int, shard: str) -> LatentDataError:
    """The error of an out-of-range label."""
    return LatentDataError(
        f"shard {shard}: example id {example_id} has label {label}; labels must lie in "
        f"[0, {num_classes}) (num_classes={num_classes} from {INDEX_FILE}; {num_classes} is the "
        "null label of classifier-free guidance, never a data label)"
    )


def _latent_error(latent: np.ndarray, example_id: int, shard: str) -> LatentDataError:
    """The error of a latent with a NaN or inf."""
    values = np.asarray(latent, np.float32)
    return LatentDataError(
        f"shard {shard}: example id {example_id} has a non-finite latent "
        f"({int(np.isnan(values).sum())} NaN and {int(np.isinf(values).sum())} inf of "
        f"{values.size} values); re-encode it with tools/prepare_imagenet_latents.py"
    )


def check_example(
    latent: np.ndarray, label: int, example_id: int, num_classes: int, shard: str = ""
) -> None:
    """`LatentDataError` naming `shard` and `example_id` unless 0 <= label < num_classes and the
    latent is finite (why: label num_classes would train as the unconditional class, a larger one
    indexes past the class table, a NaN latent gives a NaN step)."""
    if not 0 <= int(label) < num_classes:
        raise _label_error(int(label), example_id, num_classes, shard)
    if not np.isfinite(np.asarray(latent, np.float32)).all():
        raise _latent_error(latent, example_id, shard)


def write_shard(path: str, records: Sequence[bytes]) -> int:
    """Write `records` to the ArrayRecord file `path` atomically; returns the record count.

    The file is written under a temporary name in the same directory and renamed when complete, so a
    file at `path` is always whole.
    """
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
        try:
            index = json.load(f)
        except ValueError as err:
            raise LatentDataError(f"{path} is not valid JSON ({err})") from err
    found = index.get("format") if isinstance(index, dict) else type(index).__name__
    if found != FORMAT:
        raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}")
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

    def shard_of(self, record: int) -> str:
        """Path of the shard holding global record `record` (= example id `record`)."""
        firsts = [int(s["first_id"]) for s in self.index["shards"]]
        return self.paths[int(np.searchsorted(firsts, int(record), side="right")) - 1]

    def check_num_classes(self, num_classes: int, field: str = "config.model.num_classes") -> None:
        """`LatentDataError` naming both counts unless the index's num_classes equals the model's.

        Why equality: with fewer model classes the data's labels reach past the class table (or
        hit its null label, which then trains as the unconditional class); with more, evaluation
        draws labels of classes that never occur in the data.
        """
        if int(num_classes) != self.num_classes:
            raise LatentDataError(
                f"{os.path.join(self.directory, INDEX_FILE)} has num_classes={self.num_classes}, "
                f"but the model has {field}={int(num_classes)}; they must be equal (set {field}="
                f"{self.num_classes} or prepare latents of {int(num_classes)} classes)"
            )


def _unreadable(path: str, err: BaseException) -> LatentDataError:
    """The error of a shard file ArrayRecord cannot read (truncated, overwritten, not a shard)."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    detail = str(err).strip() or type(err).__name__
    return LatentDataError(
        f"shard {path} ({size} bytes) is truncated or damaged: ArrayRecord cannot read it "
        f"({detail}); rerun tools/prepare_imagenet_latents.py after deleting it"
    )


def _count_records(path: str) -> int:
    """Number of records of the ArrayRecord file `path`; `LatentDataError` naming it if unreadable."""
    # Why RuntimeError: array_record's C++ reader reports every damage (short file, bad chunk,
    # missing footer) as a RuntimeError, sometimes without a message.
    try:
        reader = ArrayRecordReader(path)
        try:
            return int(reader.num_records())
        finally:
            reader.close()
    except RuntimeError as err:
        raise _unreadable(path, err) from err


def open_latent_shards(directory: str) -> LatentShards:
    """The shards listed in `directory/index.json`, checked to exist with the listed record counts.

    A truncated or damaged shard raises `LatentDataError` naming its path.
    """
    index = read_index(directory)
    paths, first = [], 0
    for shard in index["shards"]:
        path = os.path.join(directory, shard["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path!r} listed in {INDEX_FILE} is missing")
        if shard["first_id"] != first:
            raise ValueError(f"shard {path!r} starts at id {shard['first_id']}, expected {first}")
        count = _count_records(path)
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
        self.shards = shards
        self.paths = shards.paths
        self.latent_shape = shards.latent_shape
        self.dtype = shards.dtype
        self.num_classes = shards.num_classes
        self.record_size = (
            RECORD_HEADER.size + int(np.prod(self.latent_shape)) * self.dtype.itemsize
        )
        self.order = order
        self.global_batch_size = global_batch_size
        self.rows = rows
        self.include_ids = include_ids
        self.out_dtype = out_dtype
        self._source = None

    def _read(self, keys: list[int]) -> list[bytes]:
        """The records of global indices `keys`; `LatentDataError` naming a shard that fails."""
        try:
            if self._source is None:
                self._source = grain.sources.ArrayRecordDataSource(list(self.paths))
            return self._source.__getitems__(keys)
        except RuntimeError as err:
            # Why re-open: the data source reports damage without the file; find the first shard
            # of this batch that does not read on its own and name it.
            for path in dict.fromkeys(self.shards.shard_of(k) for k in keys):
                _count_records(path)
            shards = ", ".join(dict.fromkeys(self.shards.shard_of(k) for k in keys))
            raise LatentDataError(
                f"reading example ids {sorted(keys)[:8]} from shard(s) {shards} failed "
                f"({str(err).strip() or type(err).__name__})"
            ) from err

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """Read, decode and check rows `self.rows` of global batch `step`."""
        base = int(step) * self.global_batch_size
        keys = [int(self.order[base + int(r)]) for r in self.rows]
        records = self._read(keys)
        n = len(keys)
        x0 = np.empty((n, *self.latent_shape), self.out_dtype)
        labels = np.empty((n,), np.int64)
        ids = np.empty((n,), np.int64)
        for i, record in enumerate(records):
            if len(record) != self.record_size:  # decode again to raise, naming the shard
                decode_record(
                    record, self.latent_shape, self.dtype, shard=self.shards.shard_of(keys[i])
                )
            latent, labels[i], ids[i] = decode_record(record, self.latent_shape, self.dtype)
            x0[i] = latent
        self._check(keys, x0, labels, ids)
        batch = {"x0": x0, "labels": labels.astype(np.int32)}
        if self.include_ids:
            batch["ids"] = ids
        return batch

    def _check(self, keys: list[int], x0: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        """`LatentDataError` for the first record with a bad id, label or latent (one vectorised
        pass over the batch; why not skip: a skipped example silently changes the data)."""
        bad_id = ids != np.asarray(keys, np.int64)
        bad_label = (labels < 0) | (labels >= self.num_classes)
        bad_latent = ~np.isfinite(x0.reshape(len(keys), -1)).all(axis=1)
        bad = np.flatnonzero(bad_id | bad_label | bad_latent)
        if bad.size == 0:
            return
        i = int(bad[0])
        shard = self.shards.shard_of(keys[i])
        if bad_id[i]:
            raise LatentDataError(
                f"shard {shard}: the record at position {keys[i]} of {INDEX_FILE}'s order holds "
                f"example id {ids[i]}; the shards or their first_id entries are out of order"
            )
        check_example(x0[i], int(labels[i]), int(ids[i]), self.num_classes, shard)


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

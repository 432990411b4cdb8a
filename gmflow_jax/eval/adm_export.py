"""Sharded, resumable sampling of N images for the ADM evaluator: shard files, manifest, merge.

`docs/math.md` §5.2 (the sampler), §7 (the evaluation protocol: 50,000 images with labels uniform
and seeded by index).

Generation, one global batch of indices at a time (`ShardedSampler`):

1. `sampling.streams.IndexStreams.draw` (jitted, batch-sharded): for sample index i,
   `k_i = fold_in(PRNGKey(seed), i)`, `(k_label, k_noise, k_solver) = split(k_i, 3)`; label
   `randint(k_label, (), 0, num_classes)`, noise `normal(k_noise, [h, w, C])`;
2. `sampling.driver.SamplingDriver.run_chunk(cfg, noise, labels, keys [B, 2], w)`: the solver runs
   on sample i alone with `k_solver`, so sample i is the same whichever batch, device or host
   computes it (bit for bit when the per-device batch is the same, else up to the float rounding
   of the network's matmuls);
3. jitted VAE decode (latent models) and uint8 conversion; a pixel-space model (no VAE, e.g. the
   digits) is converted to uint8 directly.

Images: mode "adm" is ADM's `image_sample.py`, `uint8(clip((x + 1) * 127.5, 0, 255))`: the
float-to-uint8 cast truncates. Mode "round" is `gmflow_jax.models.vae.pixels_to_uint8` (round
half up), which `GMFlowPipeline` returns.

Layout. Global batches of `batch_size` indices, batch b = indices [b B, (b + 1) B), are split over
the mesh axes ("data", "fsdp"). The parameters are replicated: sampling is data parallel. Process p
holds a contiguous block of rows of every batch and writes it as the shard file
`shard_<start>_<stop>.npz` (indices [start, stop), clipped to N; padding rows past N are dropped):
`arr_0` uint8 images [n, H, W, C], `arr_1` int64 labels [n], and with `with_latents` `arr_2`
float32 latents [n, h, w, C]. Each file is written atomically.

==============================  ================================================================
name                            what it does
==============================  ================================================================
`images_to_uint8`               decoded images -> uint8 ("adm" truncation or "round")
`process_rows`                  rows [start, stop) of a global batch held by every process
`shard_plan`, `Shard`           every shard file of a run: (batch, process, start, stop)
`ShardedSampler`                indices [B] (sharded) -> images, labels (and latents)
`generate_samples`              the resumable loop: write missing shards, then merge
`read_shard`                    a shard's arrays when complete and matching, else None
`merge_shards`                  stream every shard into one `samples.npz` (ADM evaluator input)
`log_progress`                  one progress line (batches done, rate, time left)
`OutDirError`                   out_dir holds other settings' samples, or a damaged shard at merge
==============================  ================================================================

Files in `out_dir`: the shards, `run.json` (the settings the samples depend on; a rerun with other
settings is refused), `samples.npz` (the merge).

Resume: a shard counts as done when its file opens, holds exactly the expected arrays (shape, dtype)
and its labels equal `sampling.streams.sample_labels` of its indices. A batch runs again when any
process lacks its shard; processes that have theirs do not rewrite it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gmflow_jax import solvers
from gmflow_jax.atomic_file import write_atomic, write_npz_atomic
from gmflow_jax.models.vae import pixels_to_uint8
from gmflow_jax.parallel.mesh import batch_split
from gmflow_jax.parallel.sharding import batch_sharding
from gmflow_jax.paths import as_path, is_local, join, make_dirs
from gmflow_jax.sampling.driver import SamplingDriver, local_rows, put_global, replicate_tree
from gmflow_jax.sampling.streams import (
    LABEL_DTYPE,
    IndexStreams,
    check_index_array,
    check_seed,
    sample_labels,
)

Array = jax.Array

DEFAULT_NUM_SAMPLES = 50_000
"""Number of samples of the ADM evaluation (§7)."""

DEFAULT_PER_DEVICE_BATCH = 125
"""Samples per data-parallel device and batch (the official test config: 125 per GPU)."""

UINT8_MODES: tuple[str, ...] = ("adm", "round")
"""`images_to_uint8` modes (module docstring)."""

SHARD_PREFIX = "shard_"
"""Shard files are `shard_<start:08d>_<stop:08d>.npz`."""

MERGED_NAME = "samples.npz"
"""The merged file: `arr_0` [N, H, W, C] uint8 images, `arr_1` [N] labels."""

MANIFEST_NAME = "run.json"
"""The settings the samples of `out_dir` depend on."""


class OutDirError(ValueError):
    """`out_dir` holds samples of other settings, or a shard the merge needs is missing or damaged."""


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def images_to_uint8(x: Array, mode: str = "adm") -> Array:
    """Decoded images in about [-1, 1] -> uint8: "adm" `uint8(clip((x+1)*127.5, 0, 255))`, "round".

    "adm" truncates like ADM's `.to(th.uint8)`; NaN pixels become 0. "round" is
    `pixels_to_uint8` (round half up).
    """
    if mode == "adm":
        y = jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
        return jnp.where(jnp.isnan(y), 0.0, y).astype(jnp.uint8)
    if mode == "round":
        return pixels_to_uint8(x)
    raise ValueError(f"uint8 mode {mode!r} is unknown; allowed: {', '.join(UINT8_MODES)}")


# --------------------------------------------------------------------------------------------
# Layout: rows per process, shards
# --------------------------------------------------------------------------------------------


def process_rows(mesh: Mesh, batch_size: int) -> dict[int, tuple[int, int]]:
    """{process index: rows [start, stop)} of a global batch of `batch_size` on `mesh`.

    Raises ValueError when `batch_size` is not divisible by the batch split (data * fsdp) or when a
    process's rows are not contiguous.
    """
    split = batch_split(mesh)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if batch_size % split:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the {split} data-parallel devices "
            f"(mesh data * fsdp); e.g. {split * max(1, round(batch_size / split))}"
        )
    spans: dict[int, set[tuple[int, int]]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((batch_size,)).items():
        s = index[0]
        span = (s.start or 0, batch_size if s.stop is None else s.stop)
        spans.setdefault(device.process_index, set()).add(span)
    rows = {}
    for process, found in sorted(spans.items()):
        ordered = sorted(found)
        start, stop = ordered[0][0], ordered[-1][1]
        if sum(b - a for a, b in ordered) != stop - start:
            raise ValueError(
                f"process {process} holds non-contiguous batch rows {ordered}; build the mesh with "
                "gmflow_jax.parallel.mesh.make_mesh so that each process owns one block"
            )
        rows[process] = (start, stop)
    return rows


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file: the rows of global batch `batch` held by `process`, indices [start, stop)."""

    batch: int
    process: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """File name, `shard_<start:08d>_<stop:08d>.npz`."""
        return f"{SHARD_PREFIX}{self.start:08d}_{self.stop:08d}.npz"

    @property
    def size(self) -> int:
        """Number of samples in the shard."""
        return self.stop - self.start


def shard_plan(
    num_samples: int, batch_size: int, rows: Mapping[int, tuple[int, int]]
) -> list[Shard]:
    """Every non-empty shard of a run, by batch then start; together they tile [0, num_samples)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    plan = []
    for b in range(math.ceil(num_samples / batch_size)):
        base = b * batch_size
        for process, (r0, r1) in sorted(rows.items(), key=lambda kv: kv[1]):
            start, stop = base + r0, min(base + r1, num_samples)
            if start < stop:
                plan.append(Shard(b, process, start, stop))
    return plan


# --------------------------------------------------------------------------------------------
# The sharded sampling steps: streams -> driver -> decode
# --------------------------------------------------------------------------------------------


def _draw(streams: IndexStreams, mesh: Mesh, indices: Array) -> tuple[Array, Array, Array]:
    """(noise, labels, solver keys [B, 2]) of the global `indices`, batch-sharded on `mesh`."""
    sharding = batch_sharding(mesh)
    return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in streams.draw(indices))


@functools.cache
def _jitted_draw(compiler_options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """`_draw` jitted with these XLA compiler options.

    Why the sampler's options here too: the backend optimization level changes LLVM's
    floating-point code generation (FMA contraction) of the normal transform, so a sample's noise
    is the same on every process only when every process compiles it with the same options.
    """
    return jax.jit(_draw, static_argnums=(0, 1), compiler_options=dict(compiler_options) or None)


def _to_uint8(
    vae_graphdef: nnx.GraphDef | None, mode: str, mesh: Mesh, vae_state: Any, samples: Array
) -> Array:
    """Samples -> uint8 images: VAE decode first for a latent model (`vae_graphdef` given)."""
    x = samples if vae_graphdef is None else nnx.merge(vae_graphdef, vae_state).decode(samples)
    return jax.lax.with_sharding_constraint(images_to_uint8(x, mode), batch_sharding(mesh))


@functools.cache
def _jitted_to_uint8(compiler_options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """`_to_uint8` jitted with these XLA compiler options (one jit, hence one cache, per set)."""
    return jax.jit(
        _to_uint8, static_argnums=(0, 1, 2), compiler_options=dict(compiler_options) or None
    )


class ShardedSampler:
    """Global batches of sample indices -> uint8 images, labels (and latents), over `driver.mesh`.

    `driver` holds the model (a `SamplingDriver`, parameters replicated on its mesh); `cfg` is the
    sampler's `SolverConfig` (the guidance scale is a traced argument of each call, so a sweep over
    scales compiles once per solver setting). `vae` is the `(graphdef, state)` of a latent model's
    VAE, or None for a pixel-space model (its samples are the images). `compiler_options` are XLA
    options of the stream draw and the decode (the driver has its own; pass the same).
    """

    def __init__(
        self,
        driver: SamplingDriver,
        cfg: solvers.SolverConfig,
        *,
        num_classes: int,
        latent_shape: Sequence[int],
        vae: tuple[nnx.GraphDef, Any] | None,
        uint8_mode: str = "adm",
        with_latents: bool = False,
        compiler_options: Mapping[str, Any] | None = None,
    ):
        """Check the settings, place the VAE (replicated) and work out the image shape."""
        if uint8_mode not in UINT8_MODES:
            raise ValueError(f"uint8_mode={uint8_mode!r} is unknown; allowed: {UINT8_MODES}")
        self.driver = driver
        self.cfg = cfg
        self.mesh = driver.mesh
        self.num_classes = int(num_classes)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.uint8_mode = uint8_mode
        self.with_latents = bool(with_latents)
        IndexStreams(0, self.latent_shape, self.num_classes)  # validates num_classes
        if vae is None:
            self._vae_graphdef, self._vae_state = None, None
            self.image_shape = self.latent_shape
        else:
            self._vae_graphdef, state = vae
            self._vae_state = replicate_tree(state, self.mesh)
            decoded = jax.eval_shape(
                lambda s: nnx.merge(self._vae_graphdef, s).decode(
                    jnp.zeros((1, *self.latent_shape))
                ),
                state,
            )
            self.image_shape = tuple(int(s) for s in decoded.shape[1:])
        options = tuple(sorted((compiler_options or {}).items()))
        self._draw = _jitted_draw(options)
        self._to_uint8 = _jitted_to_uint8(options)

    def __call__(self, seed: int, indices: np.ndarray, guidance_scale: float) -> dict[str, Array]:
        """Samples of the global `indices` [B] (identical on every process): sharded arrays."""
        idx = put_global(check_index_array(indices), batch_sharding(self.mesh))
        streams = IndexStreams(check_seed(seed), self.latent_shape, self.num_classes)
        noise, labels, keys = self._draw(streams, self.mesh, idx)
        latents = self.driver.run_chunk(self.cfg, noise, labels, keys, guidance_scale)
        images = self._to_uint8(
            self._vae_graphdef, self.uint8_mode, self.mesh, self._vae_state, latents
        )
        out = {"images": images, "labels": labels}
        if self.with_latents:
            out["latents"] = latents
        return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_shard(path: str, arrays: Sequence[np.ndarray]) -> None:
    """Write `arr_0`, `arr_1`, ... (uncompressed .npz) atomically."""
    write_npz_atomic(path, *arrays)


def read_shard(
    path: str, size: int, image_shape: Sequence[int], labels: np.ndarray, with_latents: bool
) -> dict[str, np.ndarray] | None:
    """The shard's arrays when the file is complete and matches (module docstring), else None.

    Matches: `arr_0` uint8 [size, *image_shape], `arr_1` int64 [size] equal to `labels`, and
    `arr_2` (latents, size rows) present when `with_latents`.
    """
    want = {"arr_0": ((size, *image_shape), np.uint8), "arr_1": ((size,), LABEL_DTYPE)}
    try:
        # Local shards are read in place; others (gs://) through the path layer, whole.
        source = path if is_local(path) else io.BytesIO(as_path(path).read_bytes())
        with np.load(source, allow_pickle=False) as data:
            names = set(data.files)
            if not set(want) <= names or (with_latents and "arr_2" not in names):
                return None
            arrays = {k: data[k] for k in sorted(names)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    for key, (shape, dtype) in want.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            return None
    if "arr_2" in arrays and arrays["arr_2"].shape[0] != size:
        return None
    if not np.array_equal(arrays["arr_1"], labels):
        return None
    return arrays


def _normalized(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`payload` after a JSON round trip (tuples -> lists), for comparisons with a file."""
    return json.loads(json.dumps(payload, sort_keys=True))


def _check_or_write_manifest(out_dir: str, settings: Mapping[str, Any]) -> None:
    """Write `run.json`, or raise ValueError naming the keys where an existing one differs."""
    path = join(out_dir, MANIFEST_NAME)
    new = _normalized(settings)
    if as_path(path).is_file():
        old = json.loads(as_path(path).read_text())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
            raise OutDirError(
                f"out_dir {out_dir!r} holds samples made with other settings ({details}); use "
                "another out_dir or the same settings"
            )
        return
    text = json.dumps(new, indent=2, sort_keys=True).encode()
    write_atomic(path, lambda f: f.write(text))


def _allgather_bool(flags: np.ndarray) -> np.ndarray:
    """[processes, n] stack of every process's boolean vector (a collective when multi-process)."""
    if jax.process_count() == 1:
        return flags[None]
    return np.asarray(multihost_utils.process_allgather(flags.astype(np.int32))).astype(bool)


def _npy_header(f: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Write the .npy header of a C-order array of `shape` and `dtype`."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_2_0(f, header)


def merge_shards(
    out_dir: str,
    plan: Sequence[Shard],
    *,
    seed: int,
    num_classes: int,
    image_shape: Sequence[int],
    path: str | None = None,
) -> str:
    """Stream the shards of `plan` into one .npz (`arr_0` images, `arr_1` labels), atomically.

    Memory holds one shard at a time. Raises ValueError naming a missing or damaged shard.
    """
    path = join(out_dir, MERGED_NAME) if path is None else path
    ordered = sorted(plan, key=lambda s: s.start)
    total = sum(s.size for s in ordered)
    if [s.start for s in ordered] != [0] + [s.stop for s in ordered[:-1]]:
        raise ValueError("the shards do not tile [0, N) contiguously")
    labels_all = sample_labels(seed, np.arange(total), num_classes)

    def load(shard: Shard) -> dict[str, np.ndarray]:
        arrays = read_shard(
            join(out_dir, shard.name),
            shard.size,
            image_shape,
            labels_all[shard.start : shard.stop],
            False,
        )
        if arrays is None:
            raise OutDirError(
                f"shard {shard.name} in {out_dir!r} is missing or damaged; rerun the sampler with "
                "the same settings to regenerate it (all processes must write to a shared out_dir "
                "for the merge)"
            )
        return arrays

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                _npy_header(member, (total, *image_shape), np.uint8)
                for shard in ordered:
                    member.write(np.ascontiguousarray(load(shard)["arr_0"]).tobytes())
            with archive.open("arr_1.npy", "w", force_zip64=True) as member:
                _npy_header(member, (total,), LABEL_DTYPE)
                member.write(labels_all.astype(LABEL_DTYPE).tobytes())

    write_atomic(path, write)
    return path


def log_progress(log: Callable[[str], None], what: str, done: int, total: int, t0: float) -> None:
    """One progress line: batches done, rate, time left."""
    elapsed = time.perf_counter() - t0
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    log(f"{what}: batch {done}/{total}, {elapsed:.0f} s, about {left:.0f} s left")


def generate_samples(
    sampler: ShardedSampler,
    out_dir: str,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    guidance_scale: float,
    settings: Mapping[str, Any] | None = None,
    merge: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Write every missing shard of the run into `out_dir`, then (process 0) merge them.

    `settings` (JSON-able) is added to `run.json` with the sampler's own settings; a rerun whose
    settings differ raises ValueError before sampling. Returns {"generated": [shard names written by
    this process], "skipped": [names found complete], "merged": path or None}.
    """
    seed = check_seed(seed)
    log = log if log is not None and jax.process_index() == 0 else (lambda _: None)
    rows = process_rows(sampler.mesh, batch_size)
    plan = shard_plan(num_samples, batch_size, rows)
    make_dirs(out_dir)
    manifest = {
        "num_samples": num_samples,
        "seed": seed,
        "guidance_scale": float(guidance_scale),
        "solver_config": dataclasses.asdict(sampler.cfg),
        "uint8_mode": sampler.uint8_mode,
        "num_classes": sampler.num_classes,
        "latent_shape": list(sampler.latent_shape),
        "image_shape": list(sampler.image_shape),
        **(settings or {}),
    }
    _check_or_write_manifest(out_dir, manifest)

    me = jax.process_index()
    mine = {s.batch: s for s in plan if s.process == me}
    num_batches = math.ceil(num_samples / batch_size)
    need = np.zeros(num_batches, bool)
    skipped = []
    for b, shard in mine.items():
        labels = sample_labels(seed, np.arange(shard.start, shard.stop), sampler.num_classes)
        arrays = read_shard(
            join(out_dir, shard.name),
            shard.size,
            sampler.image_shape,
            labels,
            sampler.with_latents,
        )
        if arrays is None:
            need[b] = True
        else:
            skipped.append(shard.name)
    todo = np.flatnonzero(_allgather_bool(need).any(axis=0))
    log(
        f"{num_samples} samples in {num_batches} batches of {batch_size} on {jax.device_count()} "
        f"devices / {jax.process_count()} processes: {len(todo)} batches to run"
    )
    generated = []
    t0 = time.perf_counter()
    for done, b in enumerate(todo, 1):
        out = sampler(seed, np.arange(b * batch_size, (b + 1) * batch_size), guidance_scale)
        shard = mine.get(int(b))
        if shard is not None and need[b]:
            arrays = [
                local_rows(out["images"], rows[me])[: shard.size],
                local_rows(out["labels"], rows[me])[: shard.size].astype(LABEL_DTYPE),
            ]
            if "latents" in out:
                arrays.append(local_rows(out["latents"], rows[me])[: shard.size])
            _write_shard(join(out_dir, shard.name), arrays)
            generated.append(shard.name)
        log_progress(log, "sampling", done, len(todo), t0)
    merged = None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gmflow_jax.eval.adm_export.generate_samples")
    if merge and me == 0:
        merged = merge_shards(
            out_dir,
            plan,
            seed=seed,
            num_classes=sampler.num_classes,
            image_shape=sampler.image_shape,
        )
        log(f"merged {num_samples} samples into {merged}")
    return {"generated": generated, "skipped": skipped, "merged": merged}

"""Sharded, resumable sampling of N images for the ADM evaluator, and the guidance sweep.

`docs/math.md` §5.2 (the sampler: `GMFlowPipeline`'s networks and `SolverConfig`), §7 (the
evaluation protocol: 50,000 images with labels uniform and seeded by index, the probabilistic
guidance grid, the (steps, substeps) pairs); `docs/paper-facts.md` §5 (best FID and best Precision per solver
and NFE).

Random streams. For sample index i, `k_i = fold_in(PRNGKey(seed), i)` and
`(k_label, k_noise, k_solver) = split(k_i, 3)`: the label is `randint(k_label, (), 0, num_classes)`,
the initial noise `normal(k_noise, [h, w, C])`, and the solver (GM-SDE's GM draws and per-step noise)
runs on sample i alone with key `k_solver` (`jax.vmap` of `solvers.sample` over one-sample batches).
Sample i is therefore the same whichever batch, device or host computes it: bit for bit when the
per-device batch is the same, else up to the float rounding of the network's matmuls.

Images: latents -> VAE decode -> uint8. Mode "adm" is ADM's `image_sample.py`,
`uint8(clip((x + 1) * 127.5, 0, 255))`: the float-to-uint8 cast truncates. Mode "round" is
`gmflow_jax.models.vae.pixels_to_uint8` (round half up), which `GMFlowPipeline` returns.

Layout. Global batches of `batch_size` indices, batch b = indices [b B, (b + 1) B), are split over
the mesh axes ("data", "fsdp"). The parameters are replicated: sampling is data parallel. Process p
holds a contiguous block of rows of every batch and writes it as the shard file
`shard_<start>_<stop>.npz` (indices [start, stop), clipped to N; padding rows past N are dropped):
`arr_0` uint8 images [n, H, W, 3], `arr_1` int64 labels [n], and with `save_latents` `arr_2` float32
latents [n, h, w, C]. Each file is written to a temporary name and then `os.replace`d.

==============================  ================================================================
name                            what it does
==============================  ================================================================
`sample_labels`                 labels of sample indices (uniform, seeded by index)
`images_to_uint8`               decoded images -> uint8 ("adm" truncation or "round")
`process_rows`                  rows [start, stop) of a global batch held by every process
`shard_plan`, `Shard`            every shard file of a run: (batch, process, start, stop)
`replicate_tree`                a pytree replicated on every device of a mesh (multi-host safe)
`ShardedSampler`                one jitted program: indices [B] (sharded) -> images, labels, latents
`local_rows`                    this process's rows of a batch-sharded output, as numpy
`generate_samples`              the resumable loop: write missing shards, then merge
`merge_shards`                  stream every shard into one `samples.npz` (ADM evaluator input)
`reference_features`            pool features of a reference batch's images (cached)
`run_sweep`                     the guidance grid per solver and NFE -> metrics -> tables
`read_results`                  the rows of `sweep_results.jsonl`
`best_settings`                 best-FID and best-Precision setting per solver and NFE (pure)
`sweep_table_markdown`          the markdown table of `best_settings`
`write_sweep_tables`            `sweep_table.md` and `sweep_table.json` from the results
`OutDirError`                   out_dir holds other settings' samples, or a damaged shard at merge
==============================  ================================================================

Files in `out_dir`: the shards, `run.json` (the settings the samples depend on; a rerun with other
settings is refused), `samples.npz` (the merge). A sweep keeps no images: each batch goes straight
through the FID Inception (on the same mesh), and `out_dir` gets `reference_pool.npz` (the
reference images' features, computed once), `sweep_results.jsonl` (one line of metrics per setting;
settings already there are skipped when it resumes), `sweep_table.md` and `sweep_table.json`.

Resume: a shard counts as done when its file opens, holds exactly the expected arrays (shape, dtype)
and its labels equal `sample_labels` of its indices. A batch runs again when any process lacks its
shard; processes that have theirs do not rewrite it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from gmflow_jax import solvers
from gmflow_jax.atomic_file import write_atomic, write_npz_atomic
from gmflow_jax.eval.image_metrics import PAPER_REAL_SATURATION, inception_metrics, mean_saturation
from gmflow_jax.eval.inception import FIDInceptionV3, extract_features
from gmflow_jax.eval.reference_batches import iter_reference_images, read_reference_batch
from gmflow_jax.models.vae import pixels_to_uint8
from gmflow_jax.parallel.mesh import batch_split
from gmflow_jax.parallel.sharding import batch_sharding, replicated

Array = jax.Array

DEFAULT_NUM_SAMPLES = 50_000
"""Number of samples of the ADM evaluation (§7)."""

DEFAULT_PER_DEVICE_BATCH = 125
"""Samples per data-parallel device and batch (the official test config: 125 per GPU)."""

PAPER_GUIDANCE_GRID: tuple[float, ...] = (
    0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.11, 0.13,
    0.16, 0.19, 0.23, 0.27, 0.33, 0.39, 0.47, 0.55, 0.65, 0.75,
)  # fmt: skip
"""Probabilistic guidance scales w of the paper's sweep (`docs/paper-facts.md` §5, `docs/math.md` §7 and §8.2)."""

PAPER_SWEEP_STEPS: tuple[int, ...] = (8, 32)
"""NFEs of the official test config (substeps 16 and 4 by the ceil(128 / NFE) rule)."""

PAPER_SWEEP_SOLVERS: tuple[str, ...] = ("gm_ode2", "gm_sde2")
"""Solvers of the official test config."""

SWEEP_SOLVERS: tuple[str, ...] = ("gm_ode2", "gm_sde2", "gm_ode", "gm_sde")
"""Solvers a sweep accepts (probabilistic guidance needs a GM solver)."""

UINT8_MODES: tuple[str, ...] = ("adm", "round")
"""`images_to_uint8` modes (module docstring)."""

LABEL_DTYPE = np.int64
"""dtype of `arr_1` (ADM's `image_sample.py` saves int64 labels)."""

SHARD_PREFIX = "shard_"
"""Shard files are `shard_<start:08d>_<stop:08d>.npz`."""

MERGED_NAME = "samples.npz"
"""The merged file: `arr_0` [N, H, W, 3] uint8 images, `arr_1` [N] labels."""

MANIFEST_NAME = "run.json"
"""The settings the samples of `out_dir` depend on."""

RESULTS_NAME = "sweep_results.jsonl"
"""One JSON line of metrics per sweep setting."""

TABLE_MD_NAME = "sweep_table.md"
"""Best-FID / best-Precision table (markdown)."""

TABLE_JSON_NAME = "sweep_table.json"
"""Best-FID / best-Precision table (JSON)."""

REFERENCE_CACHE_NAME = "reference_pool.npz"
"""Cached Inception pool features of the reference images."""


LABEL_CHUNK = 4096
"""`sample_labels` runs on chunks of this many indices (zero-padded: one compiled shape)."""


class OutDirError(ValueError):
    """`out_dir` holds samples of other settings, or a shard the merge needs is missing or damaged."""


# --------------------------------------------------------------------------------------------
# Random streams and pixels
# --------------------------------------------------------------------------------------------


def _check_index_array(indices: Any) -> np.ndarray:
    """`indices` as int32 [n], each in [0, 2^31), else ValueError."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= 2**31):
        raise ValueError(f"indices must lie in [0, 2^31), got [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int32)


def _check_seed(seed: Any) -> int:
    """`seed` as an int in [0, 2^32), else ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2^32)")
    return int(seed)


def _stream_keys(root: Array, indices: Array) -> Array:
    """Keys [n, 3, 2] (label, noise, solver) of sample `indices` under the root key."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(root, i), 3))(indices)


def _labels_from_keys(keys: Array, num_classes: int | Array) -> Array:
    """int32 labels [n], uniform on [0, num_classes), from the label keys [n, 2]."""
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, jnp.int32))(keys)


def _noise_from_keys(keys: Array, latent_shape: tuple[int, ...]) -> Array:
    """float32 N(0, I) noise [n, *latent_shape] from the noise keys [n, 2]."""
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys)


def _chunked(fn: Callable[[Array], Array], idx: np.ndarray, chunk: int) -> np.ndarray:
    """`fn` over `idx` in zero-padded chunks of one length (one compiled shape), concatenated."""
    parts = []
    for start in range(0, max(idx.size, 1), chunk):
        part = idx[start : start + chunk]
        padded = np.concatenate([part, np.zeros(chunk - part.size, idx.dtype)])
        parts.append(np.asarray(fn(jnp.asarray(padded)))[: part.size])
    return np.concatenate(parts)


@jax.jit
def _labels_jit(root: Array, indices: Array, num_classes: Array) -> Array:
    """Jitted labels of `indices`."""
    return _labels_from_keys(_stream_keys(root, indices)[:, 0], num_classes)


def sample_labels(seed: int, indices: Any, num_classes: int) -> np.ndarray:
    """int64 labels [n] of sample `indices`: `randint(k_label(i), (), 0, num_classes)`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
    idx = _check_index_array(indices)
    root = jax.random.PRNGKey(_check_seed(seed))
    k = jnp.int32(num_classes)
    labels = _chunked(lambda i: _labels_jit(root, i, k), idx, LABEL_CHUNK)
    return labels.astype(LABEL_DTYPE)


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
# The sharded sampling program
# --------------------------------------------------------------------------------------------


def _put(value: Any, sharding: NamedSharding) -> Array:
    """A global array with `sharding` from a host value every process holds in full."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of `tree` replicated on all devices of `mesh` (multi-host safe)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: _put(a, sharding), tree)


@dataclasses.dataclass(frozen=True)
class _ProgramSpec:
    """The static part of the sampling program (hashable: a jit static argument)."""

    denoiser: Any
    spectrum: Any
    cfg: solvers.SolverConfig
    vae_graphdef: nnx.GraphDef
    num_classes: int
    latent_shape: tuple[int, int, int]
    uint8_mode: str
    with_latents: bool
    mesh: Mesh


def _program(
    spec: _ProgramSpec, params: Any, vae_state: Any, root: Array, indices: Array, scale: Array
) -> dict[str, Array]:
    """Indices [B] -> labels, per-sample solver runs, VAE decode, uint8 (module docstring)."""
    keys = _stream_keys(root, indices)
    labels = _labels_from_keys(keys[:, 0], spec.num_classes)
    noise = _noise_from_keys(keys[:, 1], spec.latent_shape)

    def one(key: Array, x: Array, y: Array) -> Array:
        out = solvers.sample(
            spec.denoiser, params, key, x[None], y[None], spec.cfg, scale, spec.spectrum
        )
        return out[0]

    latents = jax.vmap(one)(keys[:, 2], noise, labels)
    vae = nnx.merge(spec.vae_graphdef, vae_state)
    images = images_to_uint8(vae.decode(latents), spec.uint8_mode)
    out = {"images": images, "labels": labels}
    if spec.with_latents:
        out["latents"] = latents
    sharding = batch_sharding(spec.mesh)
    return {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in out.items()}


@functools.cache
def _jitted_program(compiler_options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """`_program` jitted with these XLA compiler options (one jit, hence one cache, per set)."""
    return jax.jit(_program, static_argnums=0, compiler_options=dict(compiler_options) or None)


class ShardedSampler:
    """A `GMFlowPipeline`'s networks as one jitted program over `mesh` (module docstring).

    `cfg` is the pipeline's `solver_config(...)`; the guidance scale is a traced argument of each
    call, so a sweep over scales compiles once per solver setting. `compiler_options` are XLA
    options of the program's compilation (e.g. {"xla_backend_optimization_level": 0}: fast CPU
    compiles for small models).
    """

    def __init__(
        self,
        pipe: Any,
        cfg: solvers.SolverConfig,
        mesh: Mesh,
        *,
        uint8_mode: str = "adm",
        with_latents: bool = False,
        compiler_options: Mapping[str, Any] | None = None,
    ):
        """Place the parameters (replicated) and describe the program; needs a pipeline with a VAE."""
        if uint8_mode not in UINT8_MODES:
            raise ValueError(f"uint8_mode={uint8_mode!r} is unknown; allowed: {UINT8_MODES}")
        if not pipe.has_vae:
            raise ValueError(
                "the pipeline has no VAE; load one (a converted or diffusers VAE folder) to decode "
                "the latents into images"
            )
        self.cfg = cfg
        self.mesh = mesh
        self.num_classes = int(pipe.config.num_classes)
        self.latent_shape = tuple(int(s) for s in pipe.latent_shape)
        params = pipe.params if cfg.spectral else {"denoiser": pipe.params["denoiser"]}
        vae_graphdef, vae_state = pipe._vae
        self._params = replicate_tree(params, mesh)
        self._vae_state = replicate_tree(vae_state, mesh)
        self._spec = _ProgramSpec(
            denoiser=pipe._denoiser,
            spectrum=pipe._spectrum if cfg.spectral else None,
            cfg=cfg,
            vae_graphdef=vae_graphdef,
            num_classes=self.num_classes,
            latent_shape=self.latent_shape,
            uint8_mode=uint8_mode,
            with_latents=with_latents,
            mesh=mesh,
        )
        decoded = jax.eval_shape(
            lambda s: nnx.merge(vae_graphdef, s).decode(jnp.zeros((1, *self.latent_shape))),
            vae_state,
        )
        self.image_shape = tuple(int(s) for s in decoded.shape[1:])
        self._run = _jitted_program(tuple(sorted((compiler_options or {}).items())))

    def __call__(self, seed: int, indices: np.ndarray, guidance_scale: float) -> dict[str, Array]:
        """Samples of the global `indices` [B] (identical on every process): sharded arrays."""
        idx = _check_index_array(indices)
        root = _put(jax.random.PRNGKey(_check_seed(seed)), replicated(self.mesh))
        scale = _put(np.float32(guidance_scale), replicated(self.mesh))
        global_idx = _put(idx, batch_sharding(self.mesh))
        return self._run(self._spec, self._params, self._vae_state, root, global_idx, scale)


def local_rows(array: Array, rows: tuple[int, int]) -> np.ndarray:
    """This process's rows [start, stop) of a batch-sharded global array, as numpy."""
    start, stop = rows
    out = np.empty((stop - start, *array.shape[1:]), array.dtype)
    for shard in array.addressable_shards:
        s = shard.index[0]
        a, b = s.start or 0, array.shape[0] if s.stop is None else s.stop
        out[a - start : b - start] = np.asarray(shard.data)
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_shard(path: str, arrays: Sequence[np.ndarray]) -> None:
    """Write `arr_0`, `arr_1`, ... (uncompressed .npz) atomically."""
    write_npz_atomic(path, *arrays)


def _read_shard(
    path: str, size: int, image_shape: Sequence[int], labels: np.ndarray, with_latents: bool
) -> dict[str, np.ndarray] | None:
    """The shard's arrays when the file is complete and matches (module docstring), else None."""
    want = {"arr_0": ((size, *image_shape), np.uint8), "arr_1": ((size,), LABEL_DTYPE)}
    try:
        with np.load(path, allow_pickle=False) as data:
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
    path = os.path.join(out_dir, MANIFEST_NAME)
    new = _normalized(settings)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
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
    path = os.path.join(out_dir, MERGED_NAME) if path is None else path
    ordered = sorted(plan, key=lambda s: s.start)
    total = sum(s.size for s in ordered)
    if [s.start for s in ordered] != [0] + [s.stop for s in ordered[:-1]]:
        raise ValueError("the shards do not tile [0, N) contiguously")
    labels_all = sample_labels(seed, np.arange(total), num_classes)

    def load(shard: Shard) -> dict[str, np.ndarray]:
        arrays = _read_shard(
            os.path.join(out_dir, shard.name),
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


def _log_progress(log: Callable[[str], None], what: str, done: int, total: int, t0: float) -> None:
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
    seed = _check_seed(seed)
    log = log if log is not None and jax.process_index() == 0 else (lambda _: None)
    rows = process_rows(sampler.mesh, batch_size)
    plan = shard_plan(num_samples, batch_size, rows)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "num_samples": num_samples,
        "seed": seed,
        "guidance_scale": float(guidance_scale),
        "solver_config": dataclasses.asdict(sampler.cfg),
        "uint8_mode": sampler._spec.uint8_mode,
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
        arrays = _read_shard(
            os.path.join(out_dir, shard.name),
            shard.size,
            sampler.image_shape,
            labels,
            sampler._spec.with_latents,
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
            _write_shard(os.path.join(out_dir, shard.name), arrays)
            generated.append(shard.name)
        _log_progress(log, "sampling", done, len(todo), t0)
    merged = None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gmflow_jax.eval.sampling.generate_samples")
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


# --------------------------------------------------------------------------------------------
# The guidance sweep
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _inception_program(
    graphdef: nnx.GraphDef, mesh: Mesh, state: Any, images: Array
) -> dict[str, Array]:
    """Pool features and ADM's IS logits (fc without bias) of uint8 images, batch-sharded."""
    net = nnx.merge(graphdef, state)
    pool = net(images).pool
    out = {"pool": pool, "logits": net.logits_from_pool(pool, include_bias=False)}
    sharding = batch_sharding(mesh)
    return {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in out.items()}


def reference_features(
    inception: FIDInceptionV3,
    reference_path: str,
    cache_dir: str,
    *,
    batch_size: int = 100,
    log: Callable[[str], None] | None = print,
) -> np.ndarray:
    """Pool features [M, 2048] of the reference batch's images, cached in `cache_dir`.

    The cache records the reference path; another reference recomputes it.
    """
    cache = os.path.join(cache_dir, REFERENCE_CACHE_NAME)
    key = os.path.abspath(reference_path)
    if os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["reference"]) == key:
                    return data["pool"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    if log is not None:
        log(f"Inception features of the reference images in {reference_path}")
    pool = extract_features(
        inception, iter_reference_images(reference_path, batch_size), batch_size
    )
    pool = np.asarray(pool.pool, np.float32)
    write_npz_atomic(cache, pool=pool, reference=np.asarray(key))
    return pool


def _result_key(row: Mapping[str, Any]) -> tuple:
    """Identity of a sweep setting in `sweep_results.jsonl`."""
    return (
        row["solver"],
        int(row["num_steps"]),
        int(row["num_substeps"]),
        round(float(row["guidance_scale"]), 6),
        int(row["num_samples"]),
        int(row["seed"]),
    )


def read_results(path: str) -> list[dict[str, Any]]:
    """The rows of a `sweep_results.jsonl` (empty when absent; a torn last line is dropped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _finite(value: Any) -> bool:
    """Whether `value` is a finite number."""
    return isinstance(value, int | float) and math.isfinite(value)


def best_settings(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Best-FID (lowest) and best-Precision (highest) row per (solver, NFE, substeps, N).

    Rows whose metric is missing or not finite are left out of that choice; ties go to the smaller
    guidance scale. Groups are ordered by solver, then NFE.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in results:
        key = (row["solver"], int(row["num_steps"]), int(row["num_substeps"]))
        groups.setdefault((*key, int(row["num_samples"])), []).append(row)
    table = []
    for (solver, steps, substeps, n), rows in sorted(groups.items()):
        by_fid = [r for r in rows if _finite(r.get("fid"))]
        by_prec = [r for r in rows if _finite(r.get("precision"))]
        best_fid = min(by_fid, key=lambda r: (r["fid"], r["guidance_scale"]), default=None)
        best_prec = min(by_prec, key=lambda r: (-r["precision"], r["guidance_scale"]), default=None)
        table.append(
            {
                "solver": solver,
                "num_steps": steps,
                "num_substeps": substeps,
                "num_samples": n,
                "num_settings": len(rows),
                "best_fid": None if best_fid is None else dict(best_fid),
                "best_precision": None if best_prec is None else dict(best_prec),
            }
        )
    return table


def _fmt(value: Any, digits: int) -> str:
    """A number with `digits` decimals, or "-" when missing."""
    return f"{value:.{digits}f}" if _finite(value) else "-"


def sweep_table_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Markdown of `best_settings`: best-FID and best-Precision settings per solver and NFE."""
    lines = [
        "| solver | NFE | substeps | N | best-FID w | FID | IS | Precision | Recall "
        "| best-Precision w | Precision | Recall | FID | Saturation (vs real) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        f, p = row["best_fid"] or {}, row["best_precision"] or {}
        sat = p.get("saturation_rel")
        lines.append(
            f"| {row['solver']} | {row['num_steps']} | {row['num_substeps']} | "
            f"{row['num_samples']} | {_fmt(f.get('guidance_scale'), 2)} | {_fmt(f.get('fid'), 2)} "
            f"| {_fmt(f.get('inception_score'), 1)} | {_fmt(f.get('precision'), 3)} | "
            f"{_fmt(f.get('recall'), 3)} | {_fmt(p.get('guidance_scale'), 2)} | "
            f"{_fmt(p.get('precision'), 3)} | {_fmt(p.get('recall'), 3)} | "
            f"{_fmt(p.get('fid'), 2)} | {'-' if not _finite(sat) else f'{sat:+.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def write_sweep_tables(out_dir: str, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Write `sweep_table.md` and `sweep_table.json` from the results; returns the table."""
    table = best_settings(results)
    md = sweep_table_markdown(table).encode()
    js = json.dumps(table, indent=2, sort_keys=True).encode()
    write_atomic(os.path.join(out_dir, TABLE_MD_NAME), lambda f: f.write(md))
    write_atomic(os.path.join(out_dir, TABLE_JSON_NAME), lambda f: f.write(js))
    return table


def _sweep_features(
    sampler: ShardedSampler,
    inception: tuple[nnx.GraphDef, Any],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    guidance_scale: float,
    log: Callable[[str], None],
) -> tuple[np.ndarray, np.ndarray, float]:
    """(pool [N, 2048], IS logits [N, 1008], mean saturation) of N samples at one guidance scale.

    The features are gathered on every process; the saturation sums are reduced over processes.
    """
    rows = process_rows(sampler.mesh, batch_size)
    me = jax.process_index()
    graphdef, state = inception
    pools, logits = [], []
    sat_sum, sat_count = 0.0, 0
    num_batches = math.ceil(num_samples / batch_size)
    t0 = time.perf_counter()
    for b in range(num_batches):
        out = sampler(seed, np.arange(b * batch_size, (b + 1) * batch_size), guidance_scale)
        feats = _inception_program(graphdef, sampler.mesh, state, out["images"])
        keep = min(batch_size, num_samples - b * batch_size)
        pools.append(
            np.asarray(multihost_utils.process_allgather(feats["pool"], tiled=True))[:keep]
        )
        logits.append(
            np.asarray(multihost_utils.process_allgather(feats["logits"], tiled=True))[:keep]
        )
        r0, r1 = rows[me]
        valid = max(0, min(r1, keep) - r0)
        if valid:
            images = local_rows(out["images"], rows[me])[:valid]
            sat_sum += mean_saturation(images) * valid
            sat_count += valid
        _log_progress(log, f"w={guidance_scale:g}", b + 1, num_batches, t0)
    totals = np.asarray([sat_sum, sat_count], np.float64)
    if jax.process_count() > 1:
        totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
    return np.concatenate(pools), np.concatenate(logits), float(totals[0] / totals[1])


def run_sweep(
    pipe: Any,
    mesh: Mesh,
    *,
    out_dir: str,
    inception: FIDInceptionV3,
    reference_path: str,
    solver_names: Sequence[str] = PAPER_SWEEP_SOLVERS,
    steps_list: Sequence[int] = PAPER_SWEEP_STEPS,
    guidance_grid: Sequence[float] = PAPER_GUIDANCE_GRID,
    num_substeps: int | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int,
    seed: int = 0,
    uint8_mode: str = "adm",
    compiler_options: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """The guidance sweep: FID / IS / Precision / Recall / Saturation for every setting, then tables.

    For each solver, NFE and guidance scale, `num_samples` samples (same seed for every setting)
    are scored against the reference batch (its `mu`/`sigma` for FID when present, its images for
    precision/recall). `num_substeps` applies to the GM-ODE solvers (None: ceil(128 / NFE)); GM-SDE
    runs 1 substep. Settings already in `sweep_results.jsonl` are skipped. Returns the best-FID /
    best-Precision table (`best_settings`), also written as markdown and JSON.
    """
    seed = _check_seed(seed)
    for name in solver_names:
        if name not in SWEEP_SOLVERS:
            raise ValueError(f"sweep solver {name!r} is not allowed; allowed: {SWEEP_SOLVERS}")
    for w in guidance_grid:
        if not (isinstance(w, int | float) and 0.0 < float(w) < 1.0):
            raise ValueError(f"guidance scale {w!r} of the grid must be in (0, 1)")
    process_rows(mesh, batch_size)  # validates the batch size before any work
    log = log if log is not None and jax.process_index() == 0 else (lambda _: None)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, RESULTS_NAME)

    reference = read_reference_batch(reference_path, load_images=False)
    if reference.num_images == 0:
        raise ValueError(
            f"reference batch {reference_path!r} has no images (arr_0); precision/recall needs them"
        )
    real_pool = None
    if jax.process_index() == 0:
        real_pool = reference_features(inception, reference_path, out_dir, log=log)
    graphdef, state = nnx.split(inception)
    inception_parts = (graphdef, replicate_tree(state, mesh))

    for solver in solver_names:
        ode = solver.startswith("gm_ode")
        for steps in steps_list:
            cfg = pipe.solver_config(solver, steps, num_substeps if ode else None, guidance_grid[0])
            sampler = ShardedSampler(
                pipe, cfg, mesh, uint8_mode=uint8_mode, compiler_options=compiler_options
            )
            done_keys = {_result_key(r) for r in read_results(results_path)}
            todo = []
            for w in guidance_grid:
                row_id = {
                    "solver": solver,
                    "num_steps": steps,
                    "num_substeps": cfg.num_substeps,
                    "guidance_scale": float(w),
                    "num_samples": num_samples,
                    "seed": seed,
                }
                todo.append((row_id, _result_key(row_id) not in done_keys))
            flags = np.asarray([t for _, t in todo], bool)
            if jax.process_count() > 1:
                flags = np.asarray(multihost_utils.broadcast_one_to_all(flags.astype(np.int32)))
            for (row_id, _), run in zip(todo, flags.astype(bool), strict=True):
                if not run:
                    continue
                w = row_id["guidance_scale"]
                pool, logits, saturation = _sweep_features(
                    sampler,
                    inception_parts,
                    num_samples=num_samples,
                    batch_size=batch_size,
                    seed=seed,
                    guidance_scale=w,
                    log=log,
                )
                if jax.process_index() == 0:
                    metrics = inception_metrics(
                        pool,
                        logits,
                        real_pool,
                        real_mu=reference.mu,
                        real_sigma=reference.sigma,
                    )
                    row = {
                        **row_id,
                        **metrics,
                        "saturation": saturation,
                        "saturation_rel": saturation - PAPER_REAL_SATURATION,
                    }
                    existing = read_results(results_path)
                    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*existing, row])
                    write_atomic(results_path, lambda f, t=text.encode(): f.write(t))
                    log(
                        f"{solver} NFE={steps} w={w:g}: FID {metrics['fid']:.2f} IS "
                        f"{metrics['inception_score']:.1f} precision {metrics['precision']:.3f} "
                        f"recall {metrics['recall']:.3f}"
                    )
    table = []
    if jax.process_index() == 0:
        table = write_sweep_tables(out_dir, read_results(results_path))
        log(sweep_table_markdown(table))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gmflow_jax.eval.sampling.run_sweep")
    return table

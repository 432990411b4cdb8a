"""THE sampling driver: noise -> samples in fixed-size padded chunks over a device mesh.

Every sampling caller (the checkerboard and image-task evaluations through `eval.sweep`,
`GMFlowPipeline.__call__`, `tools/sample.py` through `eval.adm_export` and `eval.guidance_sweep`)
runs its sampler here: one jitted program per chunk, `solvers.sample` (docs/math.md §5.2) on a
chunk whose batch axis is split over the mesh's data axes ("data", "fsdp"), parameters replicated
(sampling is data parallel). The guidance scale w is a traced argument, so a sweep over w compiles
once per (SolverConfig, chunk shape): with the row grammar's static stand-in scales that is once per
(row, NFE, guided or not).

Random numbers come from the caller's stream (`sampling.streams`): the driver never draws any, so
each caller keeps its exact stream. Two modes:

* chunk keys (`sample`): chunk j of the stream's noise runs as one batch with the solver key
  `stream.chunk_key(j)`;
* per-sample keys (`run_chunk` with keys `[B, 2]`): every row runs as its own one-sample batch
  (`jax.vmap`), so a sample does not depend on its batch, device or host.

Padding: a chunk is padded with zero rows to the chunk size rounded up to a multiple of the batch
split, so every chunk has one shape (one compile) and divides over the devices. With JAX's
partitionable threefry the padding rows do not change the random draws of the real rows.

The default mesh is one "data" axis over this process's devices
(`gmflow_jax.parallel.mesh.make_mesh`). `lower_chunk` lowers the same chunk program from abstract
arguments, for ahead-of-time compiles (`gmflow_jax.aot`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gmflow_jax import solvers
from gmflow_jax.parallel.mesh import MeshConfig, batch_split, make_mesh
from gmflow_jax.parallel.sharding import batch_sharding, replicated
from gmflow_jax.sampling.streams import ChunkStreams

Array = jax.Array


def local_mesh() -> Mesh:
    """One "data" axis over this process's devices (the default sampling mesh)."""
    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices())


def put_global(value: Any, sharding: NamedSharding) -> Array:
    """A global array with `sharding` from a host value every process holds in full."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of `tree` replicated on all devices of `mesh` (multi-host safe)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: put_global(a, sharding), tree)


def padded_size(chunk_size: int, mesh: Mesh) -> int:
    """`chunk_size` rounded up to a multiple of the mesh's batch split."""
    split = batch_split(mesh)
    return -(-chunk_size // split) * split


def local_rows(array: Array, rows: tuple[int, int]) -> np.ndarray:
    """This process's rows [start, stop) of a batch-sharded global array, as numpy."""
    start, stop = rows
    out = np.empty((stop - start, *array.shape[1:]), array.dtype)
    for shard in array.addressable_shards:
        s = shard.index[0]
        a, b = s.start or 0, array.shape[0] if s.stop is None else s.stop
        out[a - start : b - start] = np.asarray(shard.data)
    return out


@dataclasses.dataclass(frozen=True)
class _Program:
    """The static part of the chunk program (hashable: a jit static argument)."""

    denoiser: Any
    spectrum: Any
    cfg: solvers.SolverConfig
    mesh: Mesh
    per_sample_keys: bool


def _chunk_program(
    spec: _Program, params: Any, noise: Array, labels: Array | None, key: Array, scale: Any
) -> Array:
    """One chunk: `solvers.sample` on the whole batch, or per sample (vmap) with keys [B, 2]."""
    if spec.per_sample_keys:

        def one(k: Array, x: Array, y: Array | None) -> Array:
            y1 = None if y is None else y[None]
            return solvers.sample(
                spec.denoiser, params, k, x[None], y1, spec.cfg, scale, spec.spectrum
            )[0]

        out = jax.vmap(one)(key, noise, labels)
    else:
        out = solvers.sample(
            spec.denoiser, params, key, noise, labels, spec.cfg, scale, spec.spectrum
        )
    return jax.lax.with_sharding_constraint(out, batch_sharding(spec.mesh))


@functools.cache
def _jitted(compiler_options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """`_chunk_program` jitted with these XLA compiler options (one jit, hence one cache, per set)."""
    return jax.jit(
        _chunk_program, static_argnums=0, compiler_options=dict(compiler_options) or None
    )


def _options_key(compiler_options: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Hashable form of XLA compiler options (the `_jitted` cache key)."""
    return tuple(sorted((compiler_options or {}).items()))


def _program_spec(
    denoiser: Any, spectrum: Any, cfg: solvers.SolverConfig, mesh: Mesh, per_sample_keys: bool
) -> _Program:
    """The static program of `cfg` (the spectrum seam only when it is used: one compile)."""
    if cfg.spectral and spectrum is None:
        raise ValueError("spectral=True needs a spectrum network, and the driver has none")
    return _Program(denoiser, spectrum if cfg.spectral else None, cfg, mesh, per_sample_keys)


def lower_chunk(
    denoiser: Callable[..., Any],
    spectrum: Callable[..., Array] | None,
    cfg: solvers.SolverConfig,
    mesh: Mesh,
    params: Any,
    noise: Any,
    labels: Any,
    key: Any,
    guidance_scale: Any = None,
    *,
    compiler_options: Mapping[str, Any] | None = None,
) -> jax.stages.Lowered:
    """The chunk program that `SamplingDriver.run_chunk` runs, lowered for an AOT compile.

    The arguments are what `run_chunk` passes, as arrays or `jax.ShapeDtypeStruct`s with their
    shardings (parameters replicated, `noise` [B, ...] / `labels` [B] / per-sample keys [B, 2]
    batch-sharded, one key [2] or the scale [] replicated): e.g. `aot.compile_sampler` lowers it
    for a TPU topology without allocating parameters. `guidance_scale` is the traced w of a guided
    `cfg` (None unguided). `.compile()` the result.
    """
    spec = _program_spec(denoiser, spectrum, cfg, mesh, len(key.shape) == 2)
    program = _jitted(_options_key(compiler_options))
    return program.lower(spec, params, noise, labels, key, guidance_scale)


class SamplingDriver:
    """A denoiser (+ optional spectrum net) with its parameters placed on a mesh, ready to sample.

    `denoiser(params, x, t, labels)` and `spectrum(params, mean, var)` are the `solvers.sample`
    seams (hashable); `params` is placed replicated on `mesh` once. `compiler_options` are XLA
    options of the chunk program (e.g. {"xla_backend_optimization_level": 0}).
    """

    def __init__(
        self,
        denoiser: Callable[..., Any],
        params: Any,
        spectrum: Callable[..., Array] | None = None,
        *,
        mesh: Mesh | None = None,
        compiler_options: Mapping[str, Any] | None = None,
    ):
        """Place the parameters (replicated) on `mesh` (default `local_mesh()`)."""
        self.denoiser = denoiser
        self.spectrum = spectrum
        self.mesh = local_mesh() if mesh is None else mesh
        self.params = replicate_tree(params, self.mesh)
        self._run = _jitted(_options_key(compiler_options))

    def _spec(self, cfg: solvers.SolverConfig, per_sample_keys: bool) -> _Program:
        """The static program of `cfg` (the spectrum seam only when it is used: one compile)."""
        return _program_spec(self.denoiser, self.spectrum, cfg, self.mesh, per_sample_keys)

    def _scale(self, cfg: solvers.SolverConfig, guidance_scale: float | None) -> Array | None:
        """The traced scale of a guided cfg (None unguided: the static cfg scale, unused)."""
        if not cfg.guided:
            return None
        w = cfg.guidance_scale if guidance_scale is None else guidance_scale
        return put_global(np.float32(w), replicated(self.mesh))

    def run_chunk(
        self,
        cfg: solvers.SolverConfig,
        noise: Array,
        labels: Array | None,
        key: Array,
        guidance_scale: float | None = None,
    ) -> Array:
        """Samples of one chunk, batch-sharded on the mesh (a global array).

        `noise` [B, ...] and `labels` [B] are global batch-sharded arrays or host values every
        process holds in full; B must divide over the batch split. `key` is one solver key, or
        per-sample keys [B, 2] (each row then runs alone). `guidance_scale` is the traced w.
        """
        per_sample = np.ndim(key) == 2
        split = batch_split(self.mesh)
        if noise.shape[0] % split:
            raise ValueError(
                f"chunk of {noise.shape[0]} rows must divide over the {split} data-parallel devices"
            )
        bsh = batch_sharding(self.mesh)
        noise = noise if isinstance(noise, jax.Array) else put_global(noise, bsh)
        if labels is not None and not isinstance(labels, jax.Array):
            labels = put_global(np.asarray(labels, np.int32), bsh)
        if not isinstance(key, jax.Array) or not per_sample:
            key = put_global(key, bsh if per_sample else replicated(self.mesh))
        spec = self._spec(cfg, per_sample)
        return self._run(spec, self.params, noise, labels, key, self._scale(cfg, guidance_scale))

    def sample(
        self,
        cfg: solvers.SolverConfig,
        streams: ChunkStreams,
        num_samples: int,
        labels: Any = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        """`num_samples` samples as float32 numpy `[N, ...]` (single-process callers).

        Chunk j holds rows [j B, (j + 1) B) of `streams.noise` (and of `labels` [N] when given),
        zero-padded to the padded chunk size, and runs with `streams.chunk_key(j)`.
        """
        b = streams.chunk_size
        if num_samples < 1 or streams.noise.shape[0] < num_samples:
            raise ValueError(
                f"num_samples={num_samples} must be in [1, {streams.noise.shape[0]}] (the stream)"
            )
        if labels is not None:
            labels = np.asarray(labels, np.int32)
            if labels.shape != (num_samples,):
                raise ValueError(f"labels must have shape [{num_samples}], got {labels.shape}")
        size = padded_size(b, self.mesh)
        chunks = []
        for j, start in enumerate(range(0, num_samples, b)):
            stop = min(start + b, streams.noise.shape[0])
            x = streams.noise[start:stop]
            y = None if labels is None else labels[start : min(stop, num_samples)]
            x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
            if y is not None:
                y = np.concatenate([y, np.zeros(size - len(y), np.int32)])
            out = self.run_chunk(cfg, x, y, streams.chunk_key(j), guidance_scale)
            chunks.append(np.asarray(jax.device_get(out))[: min(b, num_samples - start)])
        return np.concatenate(chunks)

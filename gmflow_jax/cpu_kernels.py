"""Native CPU kernels for the GM reductions over the K axis, as XLA FFI custom calls.

Why: XLA:CPU (jax 0.10) compiles a sum over the K axis of `[..., K, C]` GM means into scalar code
(see `gm.cpu_reformulations`), so the GM operations that need two or three dependent passes over
the means (moment matching, the GM x Gaussian product, the re-targeted mean) run at 15-25% of the
machine's copy bandwidth. The kernels in `cpu_kernels.cc` do each of them in one vectorized pass
(README "Performance", `benchmarks/gm_ops.py`), for the latent GM of the paper's models (K = 8
components, C = 4 channels, float32); every other shape and dtype keeps the XLA forms. They are the
CPU form of five computations:

=================  ==============================================================  =========================
kernel             computes, per pixel                                             used by
=================  ==============================================================  =========================
`gm_mean`          sum_k exp(l_k) mu_k                                             `gm.gm_mean`
`gm_moments`       that mean m and sum_k exp(l_k) |mu_k - m|^2 / C                 `gm.gm_to_iso_gaussian`
`gm_product`       means a mu_k + b y, log-weights log_softmax_k(l_k - |y-mu_k|^2/d)  `gm.gm_mul_iso_gaussian`
`tilted_mean`      that GM's mean, a sum_k softmax_k(l_k - |y-mu_k|^2/d) mu_k + b y  `gm.tilted_mean`
`tilted_lse`       log sum_k exp(l_k - |y - mu_k|^2 / d) + offset                  `gm.gm_logprob`
=================  ==============================================================  =========================

with the clamps and non-finite handling of the XLA forms they replace (docs/math.md §2.1, §2.2, §2.4,
§2.5, §3.4); results agree with float64 oracles to float32 rounding (tests/unit/test_cpu_kernels.py).
`gm.tilted_mean` is the re-targeted mean of `flow.retarget_mean`.

The library is compiled from `cpu_kernels.cc` on first use with the host's C++ compiler (`$CXX`, else
`c++`; C++17 with GCC 12+ or Clang vector extensions; `-O3 -march=native`) against the FFI headers
jaxlib ships, into a cache folder
(`$GMFLOW_JAX_CACHE`, else `$XDG_CACHE_HOME/gmflow_jax`, else `~/.cache/gmflow_jax`) under a name
that hashes the source, the jaxlib version, the compiler and the CPU model and flags, so a cache
shared between machines never loads code built for another CPU. It is written to a temporary file
and renamed into place (atomic; concurrent builders race harmlessly). Compilation takes ~2 s once.
If no compiler is found or the build fails, `available()` is False, the reason is logged once, and
the callers keep the XLA forms: the kernels are a speed-up, never a requirement.

When callers use them is decided in `gm.native_kernels_apply`; `forced` overrides that (tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
SHAPE = (8, 4)
"""The (K, C) the kernels are written for (vector shuffles over one pixel's 8 x 4 means)."""
CXX_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
"""`-march=native`: the tile loops are written to be vectorized for the host's widest vector unit."""

_TARGETS = {
    "gmflow_gm_mean": "GmflowGmMean",
    "gmflow_gm_moments": "GmflowGmMoments",
    "gmflow_gm_product": "GmflowGmProduct",
    "gmflow_tilted_mean": "GmflowTiltedMean",
    "gmflow_tilted_lse": "GmflowTiltedLse",
}
"""FFI target name -> exported handler symbol of the library."""

_lock = threading.Lock()
_state: dict[str, object] = {}
"""'ok': bool once a build was attempted; 'reason': why not; 'path': the loaded library."""
_FORCED: list[bool] = []
"""A stack set by `forced` (tests, benchmarks); empty: `gm.native_kernels_apply` decides."""


def cache_dir() -> Path:
    """Where the compiled library is kept (see the module docstring)."""
    if os.environ.get("GMFLOW_JAX_CACHE"):
        return Path(os.environ["GMFLOW_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gmflow_jax"


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags (Linux), else the platform's processor string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def library_path(compiler: str) -> Path:
    """The cache path of the library for this source, jaxlib, compiler and CPU."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), version.encode()):
        key.update(part)
    key.update(_cpu_fingerprint().encode())
    key.update(" ".join(CXX_FLAGS).encode())
    return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build(compiler: str, path: Path) -> None:
    """Compile `cpu_kernels.cc` to `path` atomically (temporary file in the same folder, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {tail}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load() -> None:
    """Build (if needed), load and register the kernels once per process; record why not."""
    compiler = _compiler()
    if compiler is None:
        _state.update(ok=False, reason=f"no C++ compiler ({os.environ.get('CXX', 'c++')})")
        return
    try:
        path = library_path(compiler)
        if not path.exists():
            build(compiler, path)
        lib = ctypes.CDLL(str(path))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
    except (OSError, RuntimeError, AttributeError) as err:
        _state.update(ok=False, reason=str(err))
        return
    _state.update(ok=True, reason="", path=path)


def available() -> bool:
    """Whether the kernels are built and registered (builds them on the first call)."""
    with _lock:
        if "ok" not in _state:
            _load()
            if not _state["ok"]:
                logging.warning(
                    "gmflow_jax: native CPU kernels unavailable, using the XLA forms: %s",
                    _state["reason"],
                )
    return bool(_state["ok"])


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    available()
    return str(_state["reason"])


def forced_setting() -> bool | None:
    """The innermost `forced` setting, None outside one."""
    return _FORCED[-1] if _FORCED else None


@contextlib.contextmanager
def forced(on: bool):
    """Trace with the kernels on (where `available()` and the shapes allow) or off, whatever the
    device count; functions jitted before the block keep their trace."""
    _FORCED.append(bool(on))
    try:
        yield
    finally:
        _FORCED.pop()


def shapes_supported(means: Array) -> bool:
    """float32 means `[..., 8, 4]` with at least one pixel."""
    return means.dtype == jnp.float32 and means.shape[-2:] == SHAPE and means.size > 0


def _pixels(means: Array, logweights: Array) -> tuple[tuple[int, ...], Array, Array]:
    """(leading pixel shape, means, log-weights), validated: `[..., K, C]`, `[..., K(, 1)]`."""
    lead = means.shape[:-2]
    if logweights.shape not in (means.shape[:-1], means.shape[:-1] + (1,)):
        raise ValueError(f"logweights {logweights.shape} do not match means {means.shape}")
    return lead, means, logweights.astype(jnp.float32)


def _per_sample(x, lead: tuple[int, ...]) -> Array:
    """A per-sample scalar broadcasting to the pixels `lead`, as the kernels read it: its leading
    non-trivial axes when they are a prefix of `lead` (`[B, 1, 1]` -> `[B]`: S values for S equal
    blocks of pixels, nothing materialized per pixel), else broadcast to `lead`."""
    x = jnp.asarray(x, jnp.float32)
    shape = (1,) * (len(lead) - x.ndim) + x.shape
    i = len(shape)
    while i > 0 and shape[i - 1] == 1:
        i -= 1
    if shape[:i] == lead[:i]:
        return x.reshape(shape[:i] or (1,))
    return jnp.broadcast_to(x, lead)


def _call(target: str, out_shapes: tuple[tuple[int, ...], ...], *args: Array):
    if not available():  # registers the targets on first use
        raise RuntimeError(f"gmflow_jax native CPU kernels unavailable: {unavailable_reason()}")
    outs = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes)
    return jax.ffi.ffi_call(target, outs, vmap_method="broadcast_all")(*args)


def gm_mean(means: Array, logweights: Array) -> Array:
    """sum_k exp(l_k) mu_k `[..., C]` from means `[..., K, C]`, log-weights `[..., K(, 1)]`."""
    lead, means, lw = _pixels(means, logweights)
    (m,) = _call("gmflow_gm_mean", (lead + means.shape[-1:],), means, lw)
    return m


def gm_moments(means: Array, logweights: Array, var0: Array) -> tuple[Array, Array]:
    """(m `[..., C]` as `gm_mean`, sum_k exp(l_k) |mu_k - m|^2 / C + var0 `[..., 1]`).

    var0 (the GM's own variance) broadcasts to the pixels `[...]`.
    """
    lead, means, lw = _pixels(means, logweights)
    shapes = (lead + means.shape[-1:], lead + (1,))
    return _call("gmflow_gm_moments", shapes, means, lw, _per_sample(var0, lead))


def _tilt_args(means: Array, point: Array, *scalars: Array) -> list[Array]:
    """point `[..., C]` (float32) and the per-sample scalars (d, a, b) as the kernels read them."""
    lead = means.shape[:-2]
    out = [jnp.broadcast_to(point.astype(jnp.float32), lead + means.shape[-1:])]
    return out + [_per_sample(v, lead) for v in scalars]


def gm_product(
    means: Array, logweights: Array, point: Array, denom: Array, a: Array, b: Array
) -> tuple[Array, Array]:
    """The GM with means a mu_k + b y and log-weights log_softmax_k(l_k - |y - mu_k|^2 / d).

    means `[..., K, C]`, log-weights `[..., K(, 1)]`, point y `[..., C]`, d, a, b broadcasting to
    the pixels `[...]`; returns (means `[..., K, C]`, log-weights `[..., K, 1]`).
    """
    lead, means, lw = _pixels(means, logweights)
    shapes = (means.shape, lead + means.shape[-2:-1] + (1,))
    return _call("gmflow_gm_product", shapes, means, lw, *_tilt_args(means, point, denom, a, b))


def tilted_mean(
    means: Array, logweights: Array, point: Array, denom: Array, a: Array, b: Array
) -> Array:
    """The mean of `gm_product`'s GM, a sum_k softmax_k(l_k - |y - mu_k|^2 / d) mu_k + b y `[..., C]`."""
    lead, means, lw = _pixels(means, logweights)
    args = _tilt_args(means, point, denom, a, b)
    (out,) = _call("gmflow_tilted_mean", (lead + means.shape[-1:],), means, lw, *args)
    return out


def tilted_lse(means: Array, logweights: Array, point: Array, denom: Array, offset: Array) -> Array:
    """log sum_k exp(l_k - |y - mu_k|^2 / d) + offset `[...]`: point y `[..., C]`; d and the
    offset broadcast to the pixels `[...]` (with d = 2 s^2, the GM log-density up to the offset)."""
    lead, means, lw = _pixels(means, logweights)
    args = _tilt_args(means, point, denom, offset)
    (out,) = _call("gmflow_tilted_lse", (lead,), means, lw, *args)
    return out


def with_reference_gradient(kernel, reference):
    """`kernel`'s values with the derivatives of `reference` (the XLA form of the same function).

    The kernels have no derivative of their own: a JVP (forward mode, and reverse mode through its
    transpose) differentiates the XLA form at the same inputs, whose values agree with the
    kernel's to float32 rounding. Only differentiation runs the XLA form; plain calls run the kernel.
    """
    fn = jax.custom_jvp(kernel)

    def jvp(primals, tangents):
        return kernel(*primals), jax.jvp(reference, primals, tangents)[1]

    fn.defjvp(jvp)
    return fn

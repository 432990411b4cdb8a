"""The one network wrapper: a model -> the pure functions the solvers and the train step call (§6).

The rest of the code never holds a network: a model is `graphdef, params = nnx.split(model)`, and

* the denoiser `denoiser(params, x_t [B,H,W,C], t [B], labels [B] | None)` returns a GM over u
  (§6.1, §6.4) or the u mean `[B,H,W,C]` of a mean-only flow-matching baseline;
* the spectrum `spectrum(params, m [B,H,W,C], v [B,H,W,1] | [B,1,1,1])` returns psi `[B,H,W,C]`
  float32 (the SpectrumMLP, §6.3), used by the spectral loss (§4.3) and spectral sampling (§5.7).

`params` is always the full state `nnx.split(model)[1]`; for an `ImageDenoiser` the functions
pick their subtree (`"denoiser"`, `"spectrum_net"`) themselves, so one parameter tree (one
optimizer, one EMA, one checkpoint) serves both. Both functions are frozen, hashable dataclasses
(equal graphdefs compare equal), so they can be static arguments of a jitted step or sampler.

==============================  =================================================================
name                            what it is
==============================  =================================================================
`network_functions`             (denoiser, spectrum or None) of a concrete or abstract model
`DenoiserFn`, `SpectrumFn`      the two functions (graphdef + the subtree they read)
`lift`                          re-binds closed-over params in the current trace (below)
==============================  =================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax.gm import GM
from gmflow_jax.models.image_denoiser import DENOISER, SPECTRUM_NET, ImageDenoiser

Array = jax.Array
PyTree = Any


def lift(tree: PyTree) -> PyTree:
    """`a + 0` for every numeric leaf: brings closed-over parameters into the current trace.

    Why: the solvers evaluate the network inside `jax.eval_shape` and `lax.scan` bodies that close
    over the jitted parameters, and NNX's `nnx.scan` over stacked blocks (`scan_blocks=True`)
    refuses variables holding tracers of an outer trace; one element-wise op per leaf re-binds them
    (XLA removes it, so results are bit-identical). Every numeric leaf is lifted (integer and bool
    state too, which `nnx.scan` refuses alike); PRNG key leaves, which have no addition, pass
    through unchanged.
    """

    def lift_leaf(a: Any) -> Any:
        dtype = jnp.result_type(a)
        if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            return a
        return a + jnp.zeros((), dtype)

    return jax.tree.map(lift_leaf, tree)


@dataclasses.dataclass(frozen=True)
class DenoiserFn:
    """`(params, x_t, t, labels) -> GM over u` (or the u mean) of an NNX network graphdef.

    `component` names the network's subtree in `params` ("denoiser" of an `ImageDenoiser`), or is
    None when `params` is the network's own state (the toy MLP, a bare GM-DiT).
    """

    graphdef: nnx.GraphDef
    component: str | None = None

    def __call__(
        self, params: PyTree, x_t: Array, t: Array, labels: Array | None = None
    ) -> GM | Array:
        """Evaluate the network at `x_t` `[B, H, W, C]`, times `t` `[B]`, labels `[B]` or None."""
        state = params if self.component is None else params[self.component]
        return nnx.merge(self.graphdef, lift(state))(x_t, t, labels)


@dataclasses.dataclass(frozen=True)
class SpectrumFn:
    """`(params, m, v) -> psi` float32 of the SpectrumMLP graphdef, on `params["spectrum_net"]`."""

    graphdef: nnx.GraphDef
    component: str = SPECTRUM_NET

    def __call__(self, params: PyTree, m: Array, v: Array) -> Array:
        """psi `[B, H, W, C]` of the x0 Gaussian (m `[B,H,W,C]`, v `[B,H,W,1]` or `[B,1,1,1]`)."""
        return nnx.merge(self.graphdef, lift(params[self.component]))(m, v)


def network_functions(model: nnx.Module) -> tuple[DenoiserFn, SpectrumFn | None]:
    """(denoiser, spectrum or None) of `model`, concrete or from `nnx.eval_shape`.

    An `ImageDenoiser` gives its GM-DiT on `params["denoiser"]` and, when it has one, its
    SpectrumMLP on `params["spectrum_net"]`; any other network (the toy MLP, a bare GM-DiT) is
    the denoiser on the whole state, with no spectrum.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not isinstance(model, ImageDenoiser):
        return DenoiserFn(nnx.split(model)[0]), None
    denoiser = DenoiserFn(nnx.split(model.denoiser)[0], DENOISER)
    if model.spectrum_net is None:
        return denoiser, None
    return denoiser, SpectrumFn(nnx.split(model.spectrum_net)[0])

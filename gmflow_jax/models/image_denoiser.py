"""The image model of class-conditional training: GM-DiT plus an optional SpectrumMLP (§4.1-4.3, §6).

One NNX module holds both networks, so that one parameter tree (one optimizer, one EMA, one
checkpoint) serves the two seams the rest of the code uses:

* the denoiser seam `(params, x_t [B,H,W,C], t [B], labels [B]) -> GM over u` (§6.1), or the u mean
  `[B,H,W,C]` for the K = 1 mean-only flow-matching baseline;
* the spectrum seam `(params, m [B,H,W,C], v [B,H,W,1] | [B,1,1,1]) -> psi [B,H,W,C]` (§6.3), used by
  the spectral loss (§4.3) and spectral sampling (§5.7).

`nnx.split(ImageDenoiser(...))` gives the state `{"denoiser": <GM-DiT>, "spectrum_net": <SpectrumMLP>}`
(the layout `gmflow_jax.pipeline.GMFlowPipeline.from_checkpoint` reads); without a SpectrumMLP the
state is `{"denoiser": <GM-DiT>}`. `NNXDenoiser(graphdef)` of the whole module also works (it calls
`ImageDenoiser.__call__`); `image_seams` gives the cheaper per-component seams used for training and
sampling.

==============================  =================================================================
name                            what it is
==============================  =================================================================
`SpectrumConfig`                SpectrumMLP sizes (§6.3): base_size (C, H0, W0), layers
`ImageDenoiser`                 GM-DiT (§6.1) + optional SpectrumMLP (§6.3) as one module
`ComponentFn`                   a hashable seam calling one component on `params[name]`
`image_seams`                   (denoiser seam, spectrum seam or None) of an `ImageDenoiser`
==============================  =================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax.gm import GM
from gmflow_jax.models.gm_dit import GMDiT, GMDiTConfig
from gmflow_jax.models.spectrum_mlp import SpectrumMLP

Array = jax.Array

DENOISER = "denoiser"
"""Name of the GM-DiT in the parameter tree."""

SPECTRUM_NET = "spectrum_net"
"""Name of the SpectrumMLP in the parameter tree."""


@dataclasses.dataclass(frozen=True)
class SpectrumConfig:
    """SpectrumMLP sizes (§6.3); defaults are ImageNet-256's (4, 32, 32) with layers (64, 8)."""

    base_size: tuple[int, int, int] = (4, 32, 32)  # (C, H0, W0) of the learned spectrum
    layers: tuple[int, int] = (64, 8)  # the two hidden widths

    def __post_init__(self) -> None:
        """Validate the sizes, naming the bad field."""
        base = tuple(self.base_size)
        if len(base) != 3 or any(not isinstance(s, int) or s <= 0 for s in base):
            raise ValueError(f"SpectrumConfig.base_size must be (C, H0, W0) ints > 0, got {base}")
        layers = tuple(self.layers)
        if len(layers) != 2 or any(not isinstance(n, int) or n <= 0 for n in layers):
            raise ValueError(f"SpectrumConfig.layers must be two ints > 0, got {layers}")


class ImageDenoiser(nnx.Module):
    """GM-DiT (`denoiser`) and an optional SpectrumMLP (`spectrum_net`) in one module."""

    def __init__(
        self, config: GMDiTConfig, spectrum: SpectrumConfig | None = None, *, rngs: nnx.Rngs
    ):
        """Build the GM-DiT and, if `spectrum` is given, a float32 SpectrumMLP fitting its images."""
        if spectrum is not None:
            c, h0, w0 = spectrum.base_size
            s = config.sample_size
            if config.mean_only:
                raise ValueError(
                    "spectrum must be None for a mean_only GM-DiT (the spectral loss needs a GM)"
                )
            if c != config.in_channels or not ((h0, w0) == (s, s) or (s < h0 and s < w0)):
                raise ValueError(
                    f"spectrum base_size {spectrum.base_size} does not fit images "
                    f"[{s}, {s}, {config.in_channels}]: C must match and H0, W0 must equal "
                    f"{s} or exceed it"
                )
        self.config = config
        self.spectrum_config = spectrum
        self.denoiser = GMDiT(config, rngs=rngs)
        self.spectrum_net = (
            SpectrumMLP(spectrum.base_size, spectrum.layers, dtype=jnp.float32, rngs=rngs)
            if spectrum is not None
            else None
        )

    def __call__(self, x: Array, t: Array, y: Array) -> GM | Array:
        """The GM-DiT: a GM over u at (x `[B,H,W,C]`, t `[B]`, labels `[B]`), or the u mean."""
        return self.denoiser(x, t, y)

    def spectrum(self, m: Array, v: Array) -> Array:
        """psi `[B,H,W,C]` float32 of the x0 Gaussian (m, v) from the SpectrumMLP (§6.3)."""
        if self.spectrum_net is None:
            raise ValueError("this ImageDenoiser has no SpectrumMLP (spectrum=None)")
        return self.spectrum_net(m, v)


def _lift(tree: Any) -> Any:
    """`tree + 0` leaf-wise: brings closed-over parameters into the current trace (XLA drops it).

    The solvers evaluate the network inside `jax.eval_shape` and `lax.scan` bodies that close over
    the jitted parameters; `nnx.scan` over stacked blocks (`scan_blocks=True`) refuses variables
    holding tracers of an outer trace.
    """
    return jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), tree)


@dataclasses.dataclass(frozen=True)
class ComponentFn:
    """Call component `name` (graphdef `graphdef`) of a parameter tree: `fn(params, *args)`.

    Frozen and hashable, so it can be a static argument of a jitted train step or sampler.
    """

    graphdef: nnx.GraphDef
    name: str

    def __call__(self, params: Mapping[str, Any], *args: Array) -> Any:
        """Evaluate the component on `params[name]` with positional inputs `args`."""
        return nnx.merge(self.graphdef, _lift(params[self.name]))(*args)


def image_seams(model: ImageDenoiser) -> tuple[ComponentFn, ComponentFn | None]:
    """(denoiser seam, spectrum seam or None) of an `ImageDenoiser` (concrete or `nnx.eval_shape`)."""
    if not isinstance(model, ImageDenoiser):
        raise ValueError(f"model must be an ImageDenoiser, got {type(model).__name__}")
    denoiser = ComponentFn(nnx.split(model.denoiser)[0], DENOISER)
    if model.spectrum_net is None:
        return denoiser, None
    return denoiser, ComponentFn(nnx.split(model.spectrum_net)[0], SPECTRUM_NET)

"""The image model of class-conditional training: GM-DiT plus an optional SpectrumMLP (§4.1-4.3, §6).

One NNX module holds both networks, so that one parameter tree (one optimizer, one EMA, one
checkpoint) serves both: `nnx.split(ImageDenoiser(...))[1]` is the state
`{"denoiser": <GM-DiT>, "spectrum_net": <SpectrumMLP>}`, or `{"denoiser": <GM-DiT>}` without a
SpectrumMLP (the layout `gmflow_jax.pipeline.GMFlowPipeline.from_checkpoint` restores).
`gmflow_jax.models.denoiser.network_functions` turns it into the pure denoiser and spectrum
functions the solvers and the train step call; `gmflow_jax.models.builder.build_model` builds it
from `config.model`.

One dtype rule: the SpectrumMLP computes in float32 on every path (training, our checkpoints, the
official checkpoint), whatever the GM-DiT's compute dtype. Why: its output psi is a log power
spectrum fed to the float32 spectral loss (§4.3) and spectral sampling (§5.7), and the network is
tiny (37,576 parameters at ImageNet size), so bf16 would cost accuracy and save nothing.

==============================  =================================================================
name                            what it is
==============================  =================================================================
`SpectrumConfig`                SpectrumMLP sizes (§6.3): base_size (C, H0, W0), layers
`check_spectrum_fits`           a SpectrumMLP base size fits a GM-DiT's images (else ValueError)
`ImageDenoiser`                 GM-DiT (§6.1) + optional float32 SpectrumMLP (§6.3) as one module
`DENOISER`, `SPECTRUM_NET`      the names of the two networks in the state
==============================  =================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


def check_spectrum_fits(config: GMDiTConfig, base_size: Sequence[int]) -> None:
    """Raise ValueError unless a SpectrumMLP of `base_size` (C, H0, W0) fits `config`'s images.

    It fits a GM head (not `mean_only`: the spectral loss needs a GM) with C = in_channels and an
    image size s equal to (H0, W0) or smaller in both (the §6.3 frequency crop).
    """
    c, h0, w0 = (int(n) for n in base_size)
    s = config.sample_size
    if config.mean_only:
        raise ValueError(
            "spectrum must be None for a mean_only GM-DiT (the spectral loss needs a GM)"
        )
    if c != config.in_channels or not ((h0, w0) == (s, s) or (s < h0 and s < w0)):
        raise ValueError(
            f"spectrum base_size {tuple(base_size)} does not fit images "
            f"[{s}, {s}, {config.in_channels}]: C must match and H0, W0 must equal "
            f"{s} or exceed it"
        )


class ImageDenoiser(nnx.Module):
    """GM-DiT (`denoiser`) and an optional float32 SpectrumMLP (`spectrum_net`) in one module."""

    def __init__(self, denoiser: GMDiT, spectrum_net: SpectrumMLP | None = None):
        """Hold built networks (`gmflow_jax.models.builder` builds them from a config).

        Raises ValueError when the SpectrumMLP does not fit the GM-DiT's images or does not
        compute in float32 (the one dtype rule, module docstring).
        """
        if not isinstance(denoiser, GMDiT):
            raise ValueError(f"denoiser must be a GMDiT, got {type(denoiser).__name__}")
        if spectrum_net is not None:
            if not isinstance(spectrum_net, SpectrumMLP):
                raise ValueError(
                    f"spectrum_net must be a SpectrumMLP or None, got {type(spectrum_net).__name__}"
                )
            check_spectrum_fits(denoiser.config, spectrum_net.base_size)
            if spectrum_net.dtype != jnp.float32:
                raise ValueError(
                    f"spectrum_net computes in {spectrum_net.dtype.name}; the SpectrumMLP must "
                    "compute in float32 on every path (build it with dtype=float32)"
                )
        self.config = denoiser.config
        self.denoiser = denoiser
        self.spectrum_net = spectrum_net

    def __call__(self, x: Array, t: Array, y: Array) -> GM | Array:
        """The GM-DiT: a GM over u at (x `[B,H,W,C]`, t `[B]`, labels `[B]`), or the u mean."""
        return self.denoiser(x, t, y)

    def spectrum(self, m: Array, v: Array) -> Array:
        """psi `[B,H,W,C]` float32 of the x0 Gaussian (m, v) from the SpectrumMLP (§6.3)."""
        if self.spectrum_net is None:
            raise ValueError("this ImageDenoiser has no SpectrumMLP (spectrum_net=None)")
        return self.spectrum_net(m, v)

"""Model FLOPs utilization (MFU): FLOPs per train step over the devices' peak (docs/math.md §6.1).

MFU = (model FLOPs of one train step) / (step seconds x sum of the devices' peak FLOP/s). "Model
FLOPs" are the FLOPs the model needs, not what the hardware ran: the forward's matmuls and attention
products, and 2x that for the backward (the PaLM convention), so gradient checkpointing (remat), which
recomputes the forward, does not raise MFU.

Two sources of FLOPs per step:

==========================  ==========================================================================
`gm_dit_train_flops`        the GM-DiT formula (§6.1): every matmul and both attention products of
                            the forward, x 3 for forward + backward. Exact for the model's dots.
`compiled_flops`            XLA's `cost_analysis()` of a compiled step: what the program runs,
                            including remat's recompute and element-wise work. XLA counts a while
                            loop's body once, so a model under `lax.scan` / `nnx.scan`
                            (`scan_blocks=True`) is undercounted by the trip count: use the formula
                            for GM-DiT and this only for loop-free steps (e.g. the toy MLP).
==========================  ==========================================================================

Peaks (`KNOWN_CHIPS`) are the vendors' dense bf16 figures per device (chip), matched on
`jax.Device.device_kind`; an unknown kind (CPU included) gives None, and the caller reports no MFU or
measures its own peak (`measure_matmul_peak`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gmflow_jax.models.gm_dit import TIME_FREQ_DIM, GMDiTConfig

KNOWN_CHIPS = (
    # (lower-case substring of device_kind, chip name, dense bf16 peak FLOP/s per device)
    ("h100", "NVIDIA H100 (SXM)", 989e12),
    ("h200", "NVIDIA H200", 989e12),
    ("a100", "NVIDIA A100", 312e12),
    ("tpu v4", "TPU v4", 275e12),
    ("tpu v5 lite", "TPU v5e", 197e12),
    ("tpu v5e", "TPU v5e", 197e12),
    ("tpu v5p", "TPU v5p", 459e12),
    ("tpu v5", "TPU v5p", 459e12),
    ("tpu v6 lite", "TPU v6e", 918e12),
    ("tpu v6e", "TPU v6e", 918e12),
)
"""Known accelerators, first match wins (so "tpu v5 lite" is tried before "tpu v5"). Dense bf16
peaks from the vendors' data sheets; the H100 PCIe card (756 TFLOP/s) reports "H100 PCIe" and is
matched as the SXM part's 989: pass `peak_flops` explicitly there."""

TRAIN_FLOPS_FACTOR = 3
"""Forward + backward = 3 forwards (the backward computes two products per forward matmul)."""


def chip_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this `device_kind`, or None when unknown."""
    kind = device_kind.lower()
    for pattern, _, peak in KNOWN_CHIPS:
        if pattern in kind:
            return peak
    return None


def devices_peak_flops(devices: Sequence[Any] | None = None) -> float | None:
    """Summed peak FLOP/s of `devices` (default: every device of the job); None if any is unknown."""
    devices = jax.devices() if devices is None else devices
    peaks = [chip_peak_flops(d.device_kind) for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return float(sum(peaks))


def gm_dit_forward_flops(cfg: GMDiTConfig, batch_size: int) -> float:
    """FLOPs of one GM-DiT forward on `batch_size` images: its matmuls and attention products (§6.1).

    A [m, k] x [k, n] product counts 2mkn. Per image, with N tokens, width D, L blocks, MLP ratio r,
    patch p, C channels and G = K(C+1) head channels (C for a mean-only model):
    patch embedding 2N p^2 C D; time MLP 2(256 D + D^2); per block 2 D 6D (adaLN) + 2N 4D^2 (q, k,
    v, out) + 2N 2rD^2 (MLP) + 4N^2 D (q k^T and the weighted sum of v); final layer 2 D 2D + 2N D
    p^2 G; log-std head 2(D I + I) with I its hidden width. Element-wise work, the label lookup and
    the SpectrumMLP (under 0.01% at ImageNet size) are not counted.
    """
    n = cfg.grid_size**2
    d = cfg.hidden_size
    p2 = cfg.patch_size**2
    per_image = 2 * n * p2 * cfg.in_channels * d
    per_image += 2 * (TIME_FREQ_DIM * d + d * d)
    block = 2 * d * 6 * d + 2 * n * 4 * d * d + 2 * n * 2 * cfg.mlp_ratio * d * d + 4 * n * n * d
    per_image += cfg.num_layers * block
    per_image += 2 * d * 2 * d + 2 * n * d * p2 * cfg.head_channels
    if not cfg.mean_only:
        per_image += 2 * (d * cfg.logstd_inner_dim + cfg.logstd_inner_dim)
    return float(per_image) * batch_size


def gm_dit_train_flops(cfg: GMDiTConfig, batch_size: int) -> float:
    """Model FLOPs of one train step (forward + backward) on a global batch of `batch_size`."""
    return TRAIN_FLOPS_FACTOR * gm_dit_forward_flops(cfg, batch_size)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs XLA's cost analysis reports for a compiled function (`jit(f).lower(...).compile()`).

    None when the backend reports none. For an SPMD-partitioned step this is the program of one
    device; a `lax.scan` body is counted once (see the module doc).
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def model_flops_utilization(
    flops_per_step: float | None, step_seconds: float, peak_flops: float | None
) -> float | None:
    """MFU = flops_per_step / (step_seconds x peak_flops), or None when a figure is missing.

    `flops_per_step` and `peak_flops` must cover the same devices (the whole job's step FLOPs over
    the summed peak of all devices, or one device's over its own).
    """
    if flops_per_step is None or peak_flops is None:
        return None
    if not step_seconds > 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
    return flops_per_step / (step_seconds * peak_flops)


def measure_matmul_peak(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """A measured peak FLOP/s of the default device: the best of `repeats` `size`^3 matmuls.

    For a device without a table entry (a CPU); the figure is this machine's, under its load.
    """
    a = jnp.ones((size, size), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best

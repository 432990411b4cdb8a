"""Which fused attention kernel a GM-DiT block runs on this backend (`docs/math.md` §6.1 step 3).

`jax.nn.dot_product_attention` with no `implementation` takes XLA's path everywhere, including on
NVIDIA GPUs, where cuDNN's fused (flash) attention is faster and never materializes the
`[B, heads, N, N]` score matrix. The cuDNN kernel only accepts some inputs, and raises on the others,
so the choice is made here from the platform, the dtype and the head dim:

=====================  ==========================================================================
condition              why
=====================  ==========================================================================
CUDA GPU               cuDNN exists only there (ROCm, TPU and CPU take XLA's path; on TPU XLA's
                       fusion is the fast path)
bf16 or fp16           cuDNN's fused attention has no float32 kernel
head dim % 8 == 0      cuDNN's layout constraint
head dim <= 128        the limit before Hopper; <= 256 from compute capability 9.0 (H100) on
=====================  ==========================================================================

Everything else (float32 on a GPU, a head dim of 36, a CPU test) uses `"xla"`. GM-DiT's sizes all
qualify on a GPU in bf16: S/B/L have head dim 64, XL has 72.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn")
"""The `implementation` values of `jax.nn.dot_product_attention` chosen between."""

CUDNN_DTYPES = ("bfloat16", "float16")
"""Compute dtypes with a cuDNN fused-attention kernel."""

CUDNN_HEAD_DIM_MULTIPLE = 8
"""cuDNN needs the head dim to be a multiple of this."""

CUDNN_MAX_HEAD_DIM = 128
"""The largest head dim cuDNN takes before Hopper."""

CUDNN_MAX_HEAD_DIM_HOPPER = 256
"""The largest head dim cuDNN takes from compute capability 9.0 (Hopper) on."""


def choose_attention(
    platform: str, dtype: jnp.dtype | str, head_dim: int, compute_capability: str | None = None
) -> str:
    """`"cudnn"` when cuDNN's fused attention takes these inputs, else `"xla"` (see module doc).

    `platform` is `"cuda"`, `"rocm"`, `"tpu"` or `"cpu"`; `compute_capability` is the GPU's
    "major.minor" (None: assume pre-Hopper, the stricter head-dim limit).
    """
    if platform != "cuda":
        return "xla"
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return "xla"
    limit = CUDNN_MAX_HEAD_DIM
    if compute_capability is not None:
        major = int(str(compute_capability).split(".")[0])
        if major >= 9:
            limit = CUDNN_MAX_HEAD_DIM_HOPPER
    if head_dim % CUDNN_HEAD_DIM_MULTIPLE != 0 or head_dim > limit:
        return "xla"
    return "cudnn"


def device_platform(device: jax.Device) -> tuple[str, str | None]:
    """(`"cuda"` / `"rocm"` / `"tpu"` / `"cpu"` / ..., compute capability or None) of `device`."""
    platform = device.platform
    if platform == "gpu":
        # Both NVIDIA and AMD report "gpu"; the client's platform version names the toolkit.
        version = str(getattr(device.client, "platform_version", "")).lower()
        platform = "rocm" if "rocm" in version else "cuda"
    return platform, getattr(device, "compute_capability", None)


def attention_implementation(dtype: jnp.dtype | str, head_dim: int) -> str:
    """`choose_attention` for the default device (where the jitted model runs)."""
    platform, capability = device_platform(jax.devices()[0])
    return choose_attention(platform, dtype, head_dim, capability)


def self_attention(q: Array, k: Array, v: Array) -> Array:
    """Softmax(q k^T / sqrt(head_dim)) v per head; q, k, v `[B, N, heads, head_dim]`, same dtype.

    Runs the kernel `attention_implementation` picks for this dtype and head dim.
    """
    head_dim = q.shape[-1]
    impl = attention_implementation(q.dtype, head_dim)
    return jax.nn.dot_product_attention(
        q, k, v, scale=1.0 / math.sqrt(head_dim), implementation=impl
    )

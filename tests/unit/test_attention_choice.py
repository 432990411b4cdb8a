"""Attention kernel per backend: cuDNN exactly where its constraints hold, and the same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.models import attention
from gmflow_jax.models.attention import choose_attention, self_attention
from gmflow_jax.models.gm_dit import DIT_SIZES, GMDiT, gm_dit_config


@pytest.mark.parametrize(
    "platform,dtype,head_dim,capability,want",
    [
        ("cuda", "bfloat16", 72, "9.0", "cudnn"),  # XL/2 on an H100
        ("cuda", "float16", 64, "8.0", "cudnn"),  # S/B/L on an A100
        ("cuda", "bfloat16", 128, None, "cudnn"),  # the pre-Hopper limit itself
        ("cuda", "bfloat16", 136, "8.0", "xla"),  # over 128 before Hopper
        ("cuda", "bfloat16", 136, "9.0", "cudnn"),  # Hopper takes up to 256
        ("cuda", "bfloat16", 264, "9.0", "xla"),  # over 256
        ("cuda", "bfloat16", 36, "9.0", "xla"),  # not a multiple of 8
        ("cuda", "float32", 72, "9.0", "xla"),  # no float32 kernel
        ("rocm", "bfloat16", 72, None, "xla"),
        ("tpu", "bfloat16", 72, None, "xla"),
        ("cpu", "bfloat16", 72, None, "xla"),
    ],
)
def test_cudnn_is_chosen_only_where_its_constraints_hold(
    platform, dtype, head_dim, capability, want
):
    assert choose_attention(platform, dtype, head_dim, capability) == want


def test_every_dit_size_takes_cudnn_on_an_h100_in_bf16():
    for layers, hidden, heads in DIT_SIZES.values():
        assert choose_attention("cuda", jnp.bfloat16, hidden // heads, "9.0") == "cudnn", layers


def _reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v per head in float64 (numpy)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_self_attention_on_cpu_matches_a_float64_softmax(dtype, tol):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 16, 4, 8)).astype(dtype) for kk in keys)
    got = np.asarray(self_attention(q, k, v), np.float64)
    want = _reference_attention(q, k, v)
    assert got.shape == (2, 16, 4, 8)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    explicit = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_array_equal(np.asarray(self_attention(q, k, v)), np.asarray(explicit))


def test_gm_dit_blocks_use_the_chosen_implementation(monkeypatch):
    """The block's attention goes through the choice: forcing "cudnn" on CPU must fail there."""
    cfg = gm_dit_config(
        "S/2",
        num_layers=1,
        hidden_size=32,
        num_heads=2,
        sample_size=4,
        num_classes=3,
        logstd_inner_dim=8,
        dtype="bfloat16",
    )
    model = GMDiT(cfg, rngs=nnx.Rngs(0))
    x, t, y = jnp.zeros((1, 4, 4, 4)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
    seen = []
    real = attention.choose_attention

    def spy(*args):
        seen.append(args[1:3])
        return real(*args)

    monkeypatch.setattr(attention, "choose_attention", spy)
    model(x, t, y)
    assert seen == [(jnp.dtype(jnp.bfloat16), 16)]
    monkeypatch.setattr(attention, "choose_attention", lambda *args: "cudnn")
    with pytest.raises(Exception):  # noqa: B017 - cuDNN does not exist on the CPU backend
        jax.block_until_ready(model(x, t, y))

"""MFU pieces: GM-DiT FLOPs formula against a count of the traced program's products, chip peaks."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gmflow_jax.models.gm_dit import GMDiT, gm_dit_config
from gmflow_jax.train import flops


def _dot_flops(jaxpr) -> int:
    """2 x (batch x contracting x free dims) summed over every dot_general of a closed jaxpr,
    nested jaxprs (pjit, remat, custom_jvp, scan bodies x length) included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_c, _), (lhs_b, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            contract = math.prod(lhs[i] for i in lhs_c)
            total += 2 * math.prod(out) * contract
        reps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += reps * _dot_flops(inner)
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(mean_only=True),
        dict(patch_size=4, mlp_ratio=2, num_gaussians=3),
        dict(scan_blocks=True, remat=True),
    ],
)
def test_gm_dit_forward_flops_equal_the_traced_dot_products(overrides):
    base = dict(
        num_layers=2, hidden_size=32, num_heads=4, sample_size=8, num_classes=5, logstd_inner_dim=16
    )
    cfg = gm_dit_config("S/2", **{**base, **overrides})
    model = GMDiT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = 3

    def fwd(params, x, t, y):
        return nnx.merge(graphdef, params)(x, t, y)

    args = (jnp.zeros((batch, 8, 8, 4)), jnp.ones((batch,)), jnp.zeros((batch,), jnp.int32))
    counted = _dot_flops(jax.make_jaxpr(fwd)(params, *args).jaxpr)
    assert flops.gm_dit_forward_flops(cfg, batch) == counted
    assert flops.gm_dit_train_flops(cfg, batch) == 3 * counted


def test_xl2_forward_is_the_dit_papers_118_6_gmacs_per_image():
    """DiT (Peebles & Xie) reports 118.6 Gflops (multiply-adds) for XL/2 at 256x256."""
    cfg = gm_dit_config("XL/2", mean_only=True)
    gmacs = flops.gm_dit_forward_flops(cfg, 1) / 2 / 1e9
    assert abs(gmacs - 118.6) < 0.5


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
        ("Tesla T4", None),
    ],
)
def test_chip_peaks_follow_the_data_sheets(kind, peak):
    assert flops.chip_peak_flops(kind) == peak


def test_unknown_devices_give_no_peak_and_no_mfu():
    assert flops.devices_peak_flops(jax.devices()) is None  # CPU
    assert flops.model_flops_utilization(1e12, 1.0, None) is None
    assert flops.model_flops_utilization(None, 1.0, 1e12) is None
    assert flops.model_flops_utilization(4e14, 2.0, 4e14) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step_seconds"):
        flops.model_flops_utilization(1.0, 0.0, 1.0)


def test_compiled_flops_of_a_matmul_is_2mnk():
    m, k, n = 32, 48, 16
    compiled = jax.jit(jnp.dot).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert flops.compiled_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.01)


def test_measured_peak_is_a_positive_rate():
    assert flops.measure_matmul_peak(size=64, repeats=2) > 0

"""On a one-device CPU backend (a laptop, this machine without fake devices) the GM operations on a
latent GM run the native kernels by default, and a GM-SDE 2 sampler on it matches the XLA forms.

The test suite itself runs on 8 fake devices, where the kernels stay off (a custom call cannot be
partitioned); this runs a fresh process with one device, as a user's would.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from gmflow_jax import cpu_kernels, gm as G, flow
assert jax.device_count() == 1
rng = np.random.default_rng(0)
means = jnp.asarray(rng.normal(size=(2, 6, 6, 8, 4)), jnp.float32)
lw = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 6, 6, 8, 1)), jnp.float32), -2)
gm = G.GM(means, lw, jnp.full((2, 1, 1, 1, 1), -0.5, jnp.float32))
assert G.native_kernels_apply(gm.means), cpu_kernels.unavailable_reason()
x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
t1, t2 = jnp.full((2,), 800.0), jnp.full((2,), 400.0)

def step(g, x):  # one GM-SDE-2-like update: moment match, retarget, product, density
    m, v = G.gm_to_iso_gaussian(g)
    r = flow.retarget_mean(g, x, t1, 0.5 * x, t2)
    p = G.gm_mul_iso_gaussian(g, m, jnp.full((2, 1, 1, 1), 0.7))
    return m, v, r, G.gm_mean(p), G.gm_logprob(p, r)

text = jax.jit(step).lower(gm, x).as_text()
for target in ("gmflow_gm_moments", "gmflow_tilted_mean", "gmflow_gm_product",
               "gmflow_gm_mean", "gmflow_tilted_lse"):
    assert target in text, target
native = jax.jit(step)(gm, x)
with cpu_kernels.forced(False):
    xla = jax.jit(lambda g, y: step(g, y))(gm, x)
for a, b in zip(native, xla):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)
def test_one_cpu_device_runs_the_kernels_by_default():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

"""The sampling driver (gmflow_jax/sampling/driver.py) against direct `solvers.sample` calls."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers.oracles import gm_prior_denoiser

from gmflow_jax import solvers
from gmflow_jax.parallel.mesh import MeshConfig, make_mesh
from gmflow_jax.sampling import driver as driver_lib
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import batch_streams, per_chunk_streams

MEANS = np.array([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]])
DEN = gm_prior_denoiser(MEANS, np.log(np.array([0.2, 0.5, 0.3])), 0.05)


def _one_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.local_devices()[:1])


def test_per_chunk_stream_equals_the_checkerboard_loop_bit_for_bit():
    """Chunk i: split(fold_in(key, i)) -> (noise key, solver key); the last chunk is cut."""
    key, n, b = jax.random.PRNGKey(3), 70, 32
    cfg = solvers.row_solver_config("gm_sde_2", 3)
    got = SamplingDriver(DEN, None, mesh=_one_device_mesh()).sample(
        cfg, per_chunk_streams(key, n, b, (1, 1, 2)), n
    )
    chunks = []
    for i in range(3):  # the loop the checkerboard evaluation ran before the driver
        noise_key, solver_key = jax.random.split(jax.random.fold_in(key, i))
        noise = jax.random.normal(noise_key, (b, 1, 1, 2), jnp.float32)
        chunks.append(np.asarray(solvers.sample(DEN, None, solver_key, noise, None, cfg)))
    np.testing.assert_array_equal(got, np.concatenate(chunks)[:n])


def test_batch_streams_on_eight_devices_match_direct_calls_and_padding_is_invisible():
    """13 samples in chunks of 5 (padded to 8 rows, one per device) equal unpadded direct calls."""
    key, n, b = jax.random.PRNGKey(4), 13, 5
    cfg = solvers.row_solver_config("gm_sde", 2)
    driver = SamplingDriver(DEN, None)
    assert driver.mesh.devices.size == len(jax.local_devices())
    got = driver.sample(cfg, batch_streams(key, n, b, (1, 1, 2)), n)
    noise_key, solver_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, (n, 1, 1, 2), jnp.float32)
    want = np.concatenate(
        [
            np.asarray(
                solvers.sample(
                    DEN, None, jax.random.fold_in(solver_key, j), noise[s : s + b], None, cfg
                )
            )
            for j, s in enumerate(range(0, n, b))
        ]
    )
    assert got.shape == (n, 1, 1, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_guidance_scale_is_traced_one_compile_per_config():
    """Three guided scales and three seeds: one compilation of the chunk program."""
    labels = np.arange(8, dtype=np.int32) % 3
    cfg = solvers.row_solver_config("gm_ode_2", 2, 0.3, null_label=3)
    driver = SamplingDriver(DEN, None, compiler_options={"xla_backend_optimization_level": 0})
    run = driver_lib._jitted((("xla_backend_optimization_level", 0),))
    before = run._cache_size()
    outs = [
        driver.sample(cfg, batch_streams(jax.random.PRNGKey(s), 8, 8, (1, 1, 2)), 8, labels, w)
        for s, w in ((0, 0.1), (1, 0.4), (2, 0.7))
    ]
    assert run._cache_size() == before + 1
    assert all(np.isfinite(o).all() for o in outs)

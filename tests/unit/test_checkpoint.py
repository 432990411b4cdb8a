"""Tests of the orbax checkpoint wrapper: round trip, intervals, resume order, corrupt-step fallback."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from gmflow_jax.checkpoint import Checkpointer, restore_or_init


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: object
    ema_params: dict
    rng: jax.Array


def _make_state(seed: int, step: int = 0) -> _State:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "layer": {"kernel": jax.random.normal(keys[0], (3, 4)), "bias": jnp.zeros((4,))},
        "half": jax.random.normal(keys[1], (5,)).astype(jnp.bfloat16),
    }
    tx = optax.adam(1e-3)
    return _State(
        step=jnp.int32(step),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(lambda x: x * 2, params),
        rng=keys[2],
    )


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


def test_save_restore_round_trip_is_bit_exact(tmp_path):
    state = _make_state(0, step=7)
    with Checkpointer(tmp_path / "ckpt", save_every=7) as ckpt:
        assert ckpt.save(7, state)
        ckpt.wait()
        restored, extras = ckpt.restore(7, jax.eval_shape(lambda: _make_state(1)))
    assert extras == {}
    _assert_trees_equal(restored, state)


def test_save_interval_force_and_max_to_keep(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=10, max_to_keep=2) as ckpt:
        saved = [s for s in range(1, 36) if ckpt.save(s, _make_state(0, s))]
        assert saved == [10, 20, 30]
        assert ckpt.save(35, _make_state(0, 35), force=True)
        assert not ckpt.save(35, _make_state(0, 35), force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [30, 35]


def test_async_save_keeps_the_values_of_a_state_donated_right_after(tmp_path):
    state = _make_state(0, step=1)
    expected = jax.tree.map(np.asarray, state)
    step_fn = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(1, state)
        state = step_fn(state)  # donates the buffers the async save was given
        ckpt.wait()
        restored, _ = ckpt.restore(1, jax.eval_shape(lambda: _make_state(0)))
    _assert_trees_equal(restored, expected)


def test_restore_or_init_prefers_own_latest_then_fresh(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        state, how = restore_or_init(ckpt, lambda: _make_state(3))
        assert how == "fresh initialization"
        _assert_trees_equal(state, _make_state(3))
        ckpt.save(4, _make_state(4, 4))
        ckpt.save(5, _make_state(5, 5))
        ckpt.wait()
        state, how = restore_or_init(ckpt, lambda: _make_state(3))
    assert "resumed from step 5" in how
    _assert_trees_equal(state, _make_state(5, 5))


def _corrupt(step_dir):
    """Truncate every array data file of a committed step (as a crash during a copy would)."""
    count = 0
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.sep + "d" + os.sep in path + os.sep or root.endswith(os.sep + "d"):
                with open(path, "r+b") as f:
                    f.truncate(3)
                count += 1
    assert count > 0


def test_corrupt_latest_step_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, save_every=1) as ckpt:
        ckpt.save(1, _make_state(1, 1))
        ckpt.save(2, _make_state(2, 2))
        ckpt.wait()
    _corrupt(directory / "2")
    with caplog.at_level(logging.WARNING), Checkpointer(directory, save_every=1) as ckpt:
        state, how = restore_or_init(ckpt, lambda: _make_state(9))
        assert "resumed from step 1" in how
        _assert_trees_equal(state, _make_state(1, 1))
        assert ckpt.all_steps() == [1]  # the corrupt step was moved aside ...
        assert ckpt.save(2, _make_state(7, 2))  # ... so the resumed run can save step 2 again
        ckpt.wait()
    assert any(
        "step 2" in r.getMessage() and "failed to restore" in r.getMessage() for r in caplog.records
    )
    assert len(os.listdir(str(directory) + ".corrupt")) == 1


def test_restore_from_takes_weights_only_from_another_run(tmp_path):
    other = _make_state(5, step=40)
    with Checkpointer(tmp_path / "other", save_every=40) as ckpt:
        ckpt.save(40, other)
    with Checkpointer(tmp_path / "mine", save_every=1) as ckpt:
        state, how = restore_or_init(
            ckpt, lambda: _make_state(0), restore_from=str(tmp_path / "other")
        )
    assert "from step 40" in how
    fresh = _make_state(0)
    _assert_trees_equal(state.params, other.params)
    _assert_trees_equal(state.ema_params, other.ema_params)
    _assert_trees_equal(
        (state.step, state.opt_state, state.rng), (fresh.step, fresh.opt_state, fresh.rng)
    )


def test_restore_from_missing_directory_raises(tmp_path):
    with (
        Checkpointer(tmp_path / "mine") as ckpt,
        pytest.raises(FileNotFoundError, match="restore_from"),
    ):
        restore_or_init(ckpt, lambda: _make_state(0), restore_from=str(tmp_path / "nope"))

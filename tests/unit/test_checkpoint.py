"""Tests of the orbax checkpoint wrapper: round trip, intervals, resume order, corrupt-step fallback,
integrity (checksums and manifests), resume safety (what is moved, what is fatal), failed saves."""

import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from gmflow_jax.checkpoint import (
    INTEGRITY_ITEM,
    MANIFEST_FILE,
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSaveError,
    NoRestorableCheckpointError,
    array_checksums,
    restore_or_init,
)


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: object
    ema_params: dict
    rng: jax.Array


def _make_state(seed: int, step: int = 0, width: int = 4) -> _State:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "layer": {"kernel": jax.random.normal(keys[0], (3, width)), "bias": jnp.zeros((width,))},
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
        "step 2" in r.getMessage() and "is corrupt" in r.getMessage() for r in caplog.records
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


def _flip_one_bit(step_dir) -> str:
    """Flip one bit in the middle of the largest array data file of a step; returns its path."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(root) == "d" and "ocdbt.process_" in root
    ]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def _tree_of_files(directory) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


def _save_steps(directory, steps, width=4):
    with Checkpointer(directory, save_every=1) as ckpt:
        for s in steps:
            ckpt.save(s, _make_state(s, s, width))
        ckpt.wait()


@pytest.mark.parametrize("drop_manifest", [False, True])
def test_one_flipped_byte_is_detected_and_falls_back_naming_the_step(
    tmp_path, caplog, drop_manifest
):
    # With the manifest the file hash catches it; without (killed right after the commit) the
    # restored array's checksum does.
    directory = tmp_path / "ckpt"
    _save_steps(directory, [1, 2], width=512)
    if drop_manifest:
        os.remove(directory / "2" / MANIFEST_FILE)
    damaged = _flip_one_bit(directory / "2")
    with caplog.at_level(logging.WARNING), Checkpointer(directory, save_every=1) as ckpt:
        state, how = restore_or_init(ckpt, lambda: _make_state(9, width=512))
        assert ckpt.all_steps() == [1]
    assert "resumed from step 1" in how
    _assert_trees_equal(state, _make_state(1, 1, width=512))
    warnings = [r.getMessage() for r in caplog.records if "step 2" in r.getMessage()]
    if drop_manifest:  # the bytes decode to other values, or fail to decode
        expected = ("checksum mismatch", "cannot be read")
    else:
        expected = (f"{damaged} differs from what was written",)
    assert any("is corrupt" in m and any(e in m for e in expected) for m in warnings), warnings
    assert len(os.listdir(str(directory) + ".corrupt")) == 1


def test_a_step_without_manifest_that_verifies_gets_one(tmp_path):
    directory = tmp_path / "ckpt"
    _save_steps(directory, [1])
    os.remove(directory / "1" / MANIFEST_FILE)
    with Checkpointer(directory, save_every=1) as ckpt:
        state, how = restore_or_init(ckpt, lambda: _make_state(9))
    assert "resumed from step 1" in how
    assert os.path.exists(directory / "1" / MANIFEST_FILE)


def test_structure_change_is_fatal_names_the_arrays_and_moves_nothing(tmp_path):
    directory = tmp_path / "ckpt"
    _save_steps(directory, [1, 2])
    before = _tree_of_files(directory)

    def wider_model():  # as if config.model.hidden_dim had changed
        state = _make_state(0)
        params = dict(state.params, layer={"kernel": jnp.zeros((3, 8)), "bias": jnp.zeros((8,))})
        return state.replace(params=params, opt_state=optax.adam(1e-3).init(params))

    with Checkpointer(directory, save_every=1) as ckpt:
        with pytest.raises(CheckpointMismatchError) as info:
            restore_or_init(ckpt, wider_model)
        assert ckpt.all_steps() == [1, 2]
    message = str(info.value)
    assert "step 2" in message and "['layer']['kernel']" in message and "(3, 4)" in message
    assert "(3, 8)" in message and "Nothing was moved" in message
    assert _tree_of_files(directory) == before
    assert not os.path.exists(str(directory) + ".corrupt")


def test_other_restore_error_of_an_unrecorded_step_is_fatal_and_moves_nothing(tmp_path):
    # A step written without the integrity record (older code): a failing restore cannot be
    # told from corruption, so it is not moved.
    directory = tmp_path / "ckpt"
    _save_steps(directory, [1])
    shutil.rmtree(directory / "1" / INTEGRITY_ITEM)
    os.remove(directory / "1" / MANIFEST_FILE)
    before = _tree_of_files(directory)

    def other_shapes():
        state = _make_state(0)
        return state.replace(
            ema_params=jax.tree.map(lambda x: jnp.zeros((7,), x.dtype), state.ema_params)
        )

    with Checkpointer(directory, save_every=1) as ckpt, pytest.raises(CheckpointError) as info:
        restore_or_init(ckpt, other_shapes)
    assert "nothing was moved" in str(info.value) and "step 1" in str(info.value)
    assert _tree_of_files(directory) == before


def test_every_step_corrupt_is_a_clear_error_and_moves_nothing(tmp_path):
    directory = tmp_path / "ckpt"
    _save_steps(directory, [1, 2])
    for step in (1, 2):
        _flip_one_bit(directory / str(step))
    before = _tree_of_files(directory)
    with Checkpointer(directory, save_every=1) as ckpt:
        with pytest.raises(NoRestorableCheckpointError) as info:
            restore_or_init(ckpt, lambda: _make_state(9))
    message = str(info.value)
    assert "step 2:" in message and "step 1:" in message and "Nothing was moved" in message
    assert _tree_of_files(directory) == before


def test_move_all_aside_empties_the_directory_for_an_explicit_restart(tmp_path):
    directory = tmp_path / "ckpt"
    _save_steps(directory, [1, 2])
    with Checkpointer(directory, save_every=1) as ckpt:
        target = ckpt.move_all_aside("restarted")
        assert ckpt.all_steps() == []
        state, how = restore_or_init(ckpt, lambda: _make_state(9))
    assert how == "fresh initialization"
    assert sorted(os.listdir(target)) == ["1", "2"]


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.bool_]
)
def test_checksum_changes_for_every_single_bit_flip(dtype):
    # Oracle: brute force over every bit of every element of a small array.
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 50).astype(dtype)
    base = array_checksums({"x": jnp.asarray(x)})["['x']"]["checksum"]
    bits = x.view(np.uint8).copy() if x.dtype != np.bool_ else x.astype(np.uint8)
    flat = bits.reshape(-1)
    positions = range(flat.size * 8) if x.dtype != np.bool_ else range(flat.size)
    for p in positions:
        flipped = flat.copy()
        if x.dtype == np.bool_:
            flipped[p] ^= 1
            y = flipped.reshape(x.shape).astype(bool)
        else:
            flipped[p // 8] ^= np.uint8(1 << (p % 8))
            y = flipped.view(x.dtype).reshape(x.shape)
        assert array_checksums({"x": jnp.asarray(y)})["['x']"]["checksum"] != base, p


def test_checksum_does_not_depend_on_sharding():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert array_checksums({"x": sharded}) == array_checksums({"x": x})


def test_failed_save_raises_naming_the_step_and_close_does_not_hang(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, save_every=1)
    ckpt.save(1, _make_state(1, 1))
    ckpt.wait()
    shutil.rmtree(directory)
    directory.write_text("not a directory")  # the step directory cannot be created
    start = time.perf_counter()
    with pytest.raises(CheckpointSaveError, match="step 2"):
        ckpt.save(2, _make_state(2, 2))
    ckpt.close()
    assert time.perf_counter() - start < 30


_FULL_DISK_SCRIPT = """
import sys, jax.numpy as jnp
from gmflow_jax.checkpoint import Checkpointer, CheckpointSaveError
ckpt = Checkpointer(sys.argv[1], save_every=1)
ckpt.save(1, {"w": jnp.arange(200_000, dtype=jnp.float32)})  # 800 kB into a 64 kB tmpfs
try:
    ckpt.wait()
except CheckpointSaveError as err:
    print("SAVE_ERROR", err)
ckpt.close()
"""


def test_failed_background_save_raises_and_the_process_exits_promptly(tmp_path):
    # A real full disk: a 64 kB tmpfs (needs mount rights; skipped elsewhere).
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
            capture_output=True,
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _FULL_DISK_SCRIPT, str(mount_point / "ckpt")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        elapsed = time.perf_counter() - start
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
    assert "SAVE_ERROR" in out.stdout and "step(s) [1]" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 0 and elapsed < 60

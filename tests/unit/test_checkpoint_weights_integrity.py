"""`restore_weights` (`checkpoint.restore_from`, `GMFlowPipeline.from_checkpoint`) verifies what it
reads like a resume does, and saving/restoring prints no warning of our own making."""

import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from gmflow_jax.checkpoint import (
    MANIFEST_FILE,
    Checkpointer,
    CheckpointMismatchError,
    NoRestorableCheckpointError,
    restore_weights,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    ema_params: dict


def _state(seed: int, width: int = 512) -> _State:
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    params = {"w": jax.random.normal(k[0], (3, width)), "b": jax.random.normal(k[1], (width,))}
    return _State(jnp.int32(seed), params, jax.tree.map(lambda x: 2 * x, params))


def _save(directory, steps):
    with Checkpointer(directory, save_every=1) as ckpt:
        for s in steps:
            ckpt.save(s, _state(s))
        ckpt.wait()


def _abstract(width: int = 512):
    full = jax.eval_shape(lambda: _state(0, width))
    return {"params": full.params, "ema_params": full.ema_params}


def _flip_one_bit(step_dir) -> None:
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(root) == "d"
    ]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _files(directory):
    return {
        os.path.relpath(os.path.join(r, n), directory): open(os.path.join(r, n), "rb").read()
        for r, _, names in os.walk(directory)
        for n in names
    }


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("drop_manifest", [False, True])
def test_flipped_bit_in_the_newest_step_falls_back_with_a_warning(tmp_path, caplog, drop_manifest):
    # With the manifest the file hash catches it; without, the restored arrays' checksums do.
    directory = tmp_path / "other"
    _save(directory, [1, 2])
    if drop_manifest:
        os.remove(directory / "2" / MANIFEST_FILE)
    _flip_one_bit(directory / "2")
    before = _files(directory)
    with caplog.at_level(logging.WARNING):
        weights, step = restore_weights(str(directory), _abstract())
    assert step == 1
    expected = _state(1)
    _assert_equal(weights, {"params": expected.params, "ema_params": expected.ema_params})
    assert any("step 2" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert _files(directory) == before  # another run's directory is only read


def test_every_step_corrupt_is_a_clear_error_and_nothing_moves(tmp_path):
    directory = tmp_path / "other"
    _save(directory, [1])
    _flip_one_bit(directory / "1")
    before = _files(directory)
    with pytest.raises(NoRestorableCheckpointError, match="step 1"):
        restore_weights(str(directory), _abstract())
    assert _files(directory) == before


def test_weights_of_another_shape_are_a_mismatch_not_padded(tmp_path):
    directory = tmp_path / "other"
    _save(directory, [1])
    with pytest.raises(CheckpointMismatchError, match=r"\['params'\]\['b'\]"):
        restore_weights(str(directory), _abstract(width=256))


def test_one_field_restores_alone(tmp_path):
    directory = tmp_path / "other"
    _save(directory, [3])
    weights, step = restore_weights(str(directory), {"ema_params": _abstract()["ema_params"]})
    assert step == 3
    _assert_equal(weights["ema_params"], _state(3).ema_params)


def test_save_and_restore_print_no_type_handler_warning(tmp_path):
    # Our replica-parallel floor once re-registered orbax's global jax.Array handler, which makes
    # orbax warn "Type handler registry type ... overriding jax.Array" on every run.
    script = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp
        from gmflow_jax.checkpoint import Checkpointer, restore_or_init
        state = {{"params": {{"w": jnp.ones((4, 4))}}, "ema_params": {{"w": jnp.ones((4, 4))}}}}
        with Checkpointer({str(tmp_path / "ck")!r}, save_every=1) as ckpt:
            ckpt.save(1, state)
        with Checkpointer({str(tmp_path / "ck")!r}, save_every=1) as ckpt:
            ckpt.restore_latest(jax.eval_shape(lambda: state))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overriding" not in result.stderr and "Type handler" not in result.stderr, result.stderr

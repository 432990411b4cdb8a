"""gmflow_jax.atomic_file: a reader never sees a half-written file; JSON is strict."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gmflow_jax.atomic_file import json_safe, write_atomic, write_json_atomic, write_npz_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert os.listdir(tmp_path) == ["out.bin"] and path.read_bytes() == b"old"


def test_killed_writer_leaves_the_old_file_whole(tmp_path):
    # A writer SIGKILLed in the middle of writing (after flushing half the bytes) must leave the
    # target untouched; only a hidden temporary file may remain.
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    script = textwrap.dedent(
        f"""
        import os, signal
        from gmflow_jax.atomic_file import write_atomic
        def write(f):
            f.write(b"x" * 100000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomic({str(path)!r}, write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -9
    assert path.read_bytes() == b"old"
    assert all(name == "big.bin" or name.startswith(".tmp_") for name in os.listdir(tmp_path))


def test_written_file_has_ordinary_permissions_and_replaces_the_old(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"old")
    write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 & ~umask
    assert os.listdir(tmp_path) == ["x.txt"]


def test_json_is_strict_with_non_finite_as_null_and_numpy_scalars_as_numbers(tmp_path):
    payload = {
        "a": float("nan"),
        "b": [np.float32(1.5), np.int64(3), float("inf"), (2.0, -math.inf)],
        "c": {"d": "text", "e": None, "f": True},
    }
    path = tmp_path / "m.json"
    write_json_atomic(path, payload)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == {
        "a": None,
        "b": [1.5, 3, None, [2.0, None]],
        "c": {"d": "text", "e": None, "f": True},
    }
    assert loaded == json_safe(payload)


def test_unserializable_json_raises_before_touching_the_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["m.json"]


def test_npz_round_trips_positional_and_named_arrays_at_the_exact_path(tmp_path):
    a, b = np.arange(6, dtype=np.int32).reshape(2, 3), np.linspace(0, 1, 5)
    path = tmp_path / "shard"  # no ".npz": np.savez(path) would write "shard.npz"
    write_npz_atomic(path, a, b=b)
    assert os.listdir(tmp_path) == ["shard"]
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "b"]
        np.testing.assert_array_equal(z["arr_0"], a)
        np.testing.assert_array_equal(z["b"], b)

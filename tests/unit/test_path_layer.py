"""The path layer and atomic writes on a non-local filesystem: `gs://` served by an in-memory bucket.

etils `epath` sends `gs://` paths to its fsspec backend; the fixture gives that backend fsspec's
in-memory filesystem instead of GCS (`helpers.memory_bucket`), so every byte goes through the same `epath` code a real bucket
does, and nothing touches the local disk (checked: no local `gs:` directory appears).
"""

import io
import json
import os

import numpy as np
import pytest
from helpers.memory_bucket import use_memory_bucket

from gmflow_jax import paths
from gmflow_jax.atomic_file import write_atomic, write_json_atomic, write_npz_atomic


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """An empty in-memory `gs://` filesystem; the test runs in an empty local directory."""
    memory = use_memory_bucket(monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield memory
    assert not os.path.exists(tmp_path / "gs:")  # nothing fell through to the local disk


def test_join_and_locality_keep_the_scheme():
    assert paths.join("gs://b/run", "eval", "metrics.json") == "gs://b/run/eval/metrics.json"
    assert paths.join("/tmp/run", "x.json") == "/tmp/run/x.json"
    assert not paths.is_local("gs://b/run") and paths.is_local("/tmp/run")
    with pytest.raises(ValueError, match="non-empty"):
        paths.as_path("")


def test_json_npz_and_raw_writes_land_in_the_bucket(bucket):
    run = "gs://bucket/runs/r1"
    paths.make_dirs(paths.join(run, "figures"))
    write_json_atomic(paths.join(run, "metrics.json"), {"fid": 2.5, "bad": float("nan")})
    write_npz_atomic(paths.join(run, "samples.npz"), x=np.arange(6.0).reshape(2, 3))
    write_atomic(paths.join(run, "figures", "grid.png"), lambda f: f.write(b"\x89PNG..."))
    assert json.loads(paths.as_path(paths.join(run, "metrics.json")).read_text()) == {
        "fid": 2.5,
        "bad": None,
    }
    data = paths.as_path(paths.join(run, "samples.npz")).read_bytes()
    np.testing.assert_array_equal(np.load(io.BytesIO(data))["x"], np.arange(6.0).reshape(2, 3))
    assert sorted(bucket.store) == [
        f"{run}/figures/grid.png",
        f"{run}/metrics.json",
        f"{run}/samples.npz",
    ]


def test_a_failed_write_leaves_the_previous_object_whole(bucket):
    target = "gs://bucket/run/train_log.json"
    write_json_atomic(target, {"sessions": [1]})

    def half_then_fail(f):
        f.write(b'{"sessions": [1, 2')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(target, half_then_fail)
    assert json.loads(paths.as_path(target).read_text()) == {"sessions": [1]}
    assert list(bucket.store) == [target]  # no temporary object left behind


def test_local_paths_still_use_a_temporary_file_and_rename(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]

"""A `gs://` workdir end to end: a tiny checkerboard job (`run.train_and_evaluate`, in-process) whose
workdir is an in-memory bucket behind the path layer writes every workdir file into the bucket and
nothing under a local folder named `gs:`, and a rerun resumes from what the bucket holds.

Checkpoints: orbax on `gs://` cannot reach an in-process filesystem, for two reasons found by running
it against the in-memory bucket: (1) listing the steps calls `google.cloud.storage` (orbax's
`gcs_utils.is_hierarchical_namespace_enabled` asks GCS whether the bucket has a hierarchical
namespace), a GCS client of its own, not `epath`; (2) the arrays are written by TensorStore's
native `gcs` kvstore driver (C++ HTTP to GCS), which never calls `epath` either. So here the loop's
real `Checkpointer` (real orbax) is pointed at a local folder instead of `<workdir>/checkpoints`;
everything else (run_config.json, train_log.json, metrics.json, samples.png, TensorBoard events,
the profiler trace) goes to the bucket. `test_checkpointer_keeps_a_bucket_path_a_bucket_path`
checks what orbax does receive: the `gs://` path itself, not `<cwd>/gs:/...`.
"""

import importlib.util
import io
import json
import os
import tempfile

import numpy as np
import pytest
from helpers.config_files import load_config
from helpers.event_files import parse_events
from helpers.memory_bucket import use_memory_bucket
from PIL import Image

from gmflow_jax import paths
from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.run import train_and_evaluate
from gmflow_jax.train import loop

RUN = "gs://fake-bucket/run"


def _local_gs_folders(*roots) -> list[str]:
    """Every file or folder named `gs:` under `roots` (what `os.makedirs("gs://...")` leaves)."""
    found = []
    for root in roots:
        for directory, dirs, files in os.walk(root):
            found += [os.path.join(directory, n) for n in dirs + files if n.startswith("gs:")]
    return found


def _config(num_steps):
    config = load_config("checkerboard", "tiny")
    config.train.num_steps = num_steps
    config.train.log_every = 1
    config.checkpoint.every_steps = 2
    config.eval.every_steps = 2  # the periodic evaluation's scalars and image go to TensorBoard
    config.eval.periodic_samples = 512
    config.profile.skip_steps = 0
    config.profile.num_steps = 1
    return config


def _read(key):
    return paths.as_path(key).read_bytes()


def _scalars(bucket, tag):
    """(step, value) of scalar `tag` in every event file of the run's tensorboard folder."""
    files = sorted(k for k in bucket.store if k.startswith(f"{RUN}/tensorboard/events.out."))
    events = [e for k in files for e in parse_events(_read(k))]
    return [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == tag]


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """The in-memory bucket; the test runs in an empty local folder with its own temp folder."""
    memory = use_memory_bucket(monkeypatch)
    for name in ("cwd", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return memory


def test_a_gs_workdir_receives_every_file_and_a_rerun_resumes_from_it(
    bucket, monkeypatch, tmp_path
):
    orbax_dir = tmp_path / "orbax" / "checkpoints"
    real_checkpointer = loop.Checkpointer

    def checkpointer(directory, **kwargs):
        assert directory == f"{RUN}/checkpoints"  # the loop names the bucket (see module doc)
        return real_checkpointer(str(orbax_dir), **kwargs)

    monkeypatch.setattr(loop, "Checkpointer", checkpointer)

    first = train_and_evaluate(_config(num_steps=2), RUN)
    keys = set(bucket.store)
    for name in ("run_config.json", "train_log.json", "metrics.json", "samples.png"):
        assert f"{RUN}/{name}" in keys, name
    assert any(k.startswith(f"{RUN}/tensorboard/events.out.tfevents.") for k in keys)
    traces = [k for k in keys if k.startswith(f"{RUN}/profile/plugins/profile/")]
    traces = [k for k in traces if k.endswith(".xplane.pb")]  # TensorBoard's profile layout
    assert len(traces) == 1 and len(_read(traces[0])) > 0

    # the files hold what the run computed
    metrics = json.loads(_read(f"{RUN}/metrics.json"))
    assert metrics["results"] == json.loads(json.dumps(first["results"]))
    config = _config(num_steps=2)
    rows = len(config.sample.gm_solvers)
    png = Image.open(io.BytesIO(_read(f"{RUN}/samples.png")))
    # figures.histogram_grid_png: 110 + cols * 200 wide, 30 + 30 (title) + rows * 200 high
    assert png.size == (110 + len(config.sample.gm_nfes) * 200, 60 + rows * 200)
    assert json.loads(_read(f"{RUN}/run_config.json"))["train"]["num_steps"] == 2
    losses = _scalars(bucket, "train/loss")
    assert [s for s, _ in losses] == [0, 1] and all(np.isfinite(v) for _, v in losses)
    assert [s for s, _ in _scalars(bucket, "eval/in_square_rate")] == [2]

    # a rerun with more steps resumes from step 2 and appends to the bucket's files
    second = train_and_evaluate(_config(num_steps=4), RUN)
    assert second["train"]["start_step"] == 2
    assert second["train"]["resumed"].startswith(f"resumed from step 2 of {orbax_dir}")
    sessions = json.loads(_read(f"{RUN}/train_log.json"))["sessions"]
    assert [(s["start_step"], s["end_step"]) for s in sessions] == [(0, 2), (2, 4)]
    assert [s for s, _ in _scalars(bucket, "train/loss")] == [0, 1, 2, 3]
    assert json.loads(_read(f"{RUN}/run_config.json"))["train"]["num_steps"] == 4
    assert len([k for k in bucket.store if k.endswith(".xplane.pb")]) == 2

    # nothing fell through to the local disk: no `gs:` folder in the working or temp folder, and
    # the profiler's local staging folders are gone
    assert _local_gs_folders(tmp_path, os.getcwd(), tempfile.gettempdir()) == []
    assert os.listdir(tmp_path / "tmp") == []
    assert all(k.startswith(f"{RUN}/") for k in bucket.store)


def test_checkpointer_keeps_a_bucket_path_a_bucket_path(bucket):
    """What orbax receives for a `gs://` checkpoint directory is that path (epath's `absolute()`
    would make it `<cwd>/gs:/fake-bucket/...`, a local folder), and it fails on the missing GCS
    client (see module doc) without creating anything locally."""
    try:
        has_client = importlib.util.find_spec("google.cloud.storage") is not None
    except ModuleNotFoundError:
        has_client = False
    if has_client:
        pytest.skip("google-cloud-storage is installed: orbax would contact GCS")
    with pytest.raises(ImportError, match="storage"):
        Checkpointer(f"{RUN}/checkpoints", async_save=False)
    assert _local_gs_folders(os.getcwd()) == []

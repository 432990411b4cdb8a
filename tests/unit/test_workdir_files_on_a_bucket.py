"""Each kind of workdir file, written into and read back from a `gs://` workdir served by an in-memory
bucket behind the path layer (`helpers.memory_bucket`): TensorBoard event files, copied folders
(profiler traces), PNG grids, the run-config record, ADM sample shards with their manifest and
merge; converted weights folders refuse a bucket before any work. Nothing may appear under a local
folder named `gs:` (what `os.makedirs("gs://...")` leaves)."""

import io
import json
import os

import numpy as np
import pytest
from helpers.config_files import load_config
from helpers.event_files import parse_events
from helpers.memory_bucket import use_memory_bucket
from PIL import Image

from gmflow_jax import paths
from gmflow_jax.eval import adm_export, guidance_sweep
from gmflow_jax.eval.image_grid import write_png_atomic
from gmflow_jax.interop.staged_folder import replace_folder
from gmflow_jax.run_config import RUN_CONFIG_FILE, check_run_config, config_record
from gmflow_jax.sampling.streams import LABEL_DTYPE, sample_labels
from gmflow_jax.train.event_files import summary_writer

RUN = "gs://bucket/run"


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    memory = use_memory_bucket(monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield memory
    assert not any("gs:" in n for _, dirs, files in os.walk(tmp_path) for n in dirs + files)


def _read(key):
    return paths.as_path(key).read_bytes()


def test_tensorboard_events_land_in_the_bucket_as_whole_records(bucket):
    writer = summary_writer(f"{RUN}/tensorboard", flush_secs=3600)
    for step in range(5):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.flush()
    (key,) = [k for k in bucket.store if k.startswith(f"{RUN}/tensorboard/events.out.tfevents.")]
    flushed = parse_events(_read(key))  # the stored object is whole records, never a torn one
    writer.add_scalar("train/loss", 0.125, 5)
    writer.close()
    events = parse_events(_read(key))
    assert events[0].file_version == "brain.Event:2"
    values = [(e.step, v.simple_value) for e in events for v in e.summary.value]
    assert values == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)] + [(5, 0.125)]
    # what a flush stored is a prefix of whole records (tensorboardX's `flush` writes what its
    # queue thread has taken so far; `close` drains the queue)
    assert 1 <= len(flushed) <= 6 and events[: len(flushed)] == flushed


def test_copy_tree_puts_a_local_folder_into_the_bucket(bucket, tmp_path):
    source = tmp_path / "trace"
    (source / "plugins" / "profile" / "r1").mkdir(parents=True)
    files = {"plugins/profile/r1/host.xplane.pb": b"\x00\x01trace", "top.txt": b"t"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    written = paths.copy_tree(source, f"{RUN}/profile")
    assert written == sorted(f"{RUN}/profile/{n}" for n in files)
    assert {k: _read(k) for k in written} == {f"{RUN}/profile/{n}": d for n, d in files.items()}
    with pytest.raises(NotADirectoryError, match="not a directory"):
        paths.copy_tree(tmp_path / "missing", f"{RUN}/x")


def test_png_grid_is_written_into_the_bucket(bucket):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    write_png_atomic(f"{RUN}/figures/grid.png", pixels)
    decoded = np.asarray(Image.open(io.BytesIO(_read(f"{RUN}/figures/grid.png"))))
    np.testing.assert_array_equal(decoded, pixels)


def test_run_config_record_is_compared_and_a_damaged_one_set_aside_in_the_bucket(bucket):
    config = load_config("checkerboard", "tiny")
    record = f"{RUN}/{RUN_CONFIG_FILE}"
    assert check_run_config(config, RUN, has_checkpoints=False) == []
    assert json.loads(_read(record)) == json.loads(json.dumps(config_record(config)))
    config.train.num_steps = 9  # an allowed change: reported, then recorded
    assert check_run_config(config, RUN, has_checkpoints=True) == [("train.num_steps", 4, 9)]
    paths.as_path(record).write_bytes(b'{"train": ')  # truncated
    assert check_run_config(config, RUN, has_checkpoints=True) == []
    aside = [k for k in bucket.store if k.startswith(f"{record}.damaged-")]
    assert len(aside) == 1 and _read(aside[0]) == b'{"train": '
    assert json.loads(_read(record))["train"]["num_steps"] == 9


def test_sample_shards_manifest_and_merge_in_the_bucket(bucket):
    """Shards of two processes written and read back through the bucket, the manifest checked,
    the merged file equal to the shards laid end to end (the oracle: plain numpy concatenation)."""
    num_samples, batch_size, shape, num_classes, seed = 10, 4, (2, 2, 3), 5, 7
    plan = adm_export.shard_plan(num_samples, batch_size, {0: (0, 2), 1: (2, 4)})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_samples, *shape), dtype=np.uint8)
    labels = sample_labels(seed, np.arange(num_samples), num_classes).astype(LABEL_DTYPE)
    settings = {"num_samples": num_samples, "seed": seed}
    adm_export._check_or_write_manifest(RUN, settings)
    adm_export._check_or_write_manifest(RUN, settings)  # the same settings pass
    with pytest.raises(adm_export.OutDirError, match="seed: 7 there, 8 now"):
        adm_export._check_or_write_manifest(RUN, {**settings, "seed": 8})
    for shard in plan:
        rows = slice(shard.start, shard.stop)
        adm_export._write_shard(f"{RUN}/{shard.name}", [images[rows], labels[rows]])
    first = plan[0]
    got = adm_export.read_shard(
        f"{RUN}/{first.name}", first.size, shape, labels[first.start : first.stop], False
    )
    np.testing.assert_array_equal(got["arr_0"], images[first.start : first.stop])
    assert adm_export.read_shard(f"{RUN}/absent.npz", 1, shape, labels[:1], False) is None
    merged = adm_export.merge_shards(
        RUN, plan, seed=seed, num_classes=num_classes, image_shape=shape
    )
    assert merged == f"{RUN}/{adm_export.MERGED_NAME}"
    with np.load(io.BytesIO(_read(merged))) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)


def test_converted_folder_refuses_a_bucket_before_any_work(bucket):
    calls = []
    with pytest.raises(ValueError, match=r"out_dir='gs://bucket/weights' is not a local path"):
        replace_folder(
            "gs://bucket/weights", calls.append, replaceable=lambda _: True, what="folder"
        )
    assert calls == [] and not bucket.store


def test_guidance_sweep_results_are_read_back_from_the_bucket_without_a_torn_line(bucket):
    rows = [{"solver": "gm_sde_2", "fid": 2.5}, {"solver": "gm_ode_2", "fid": 3.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"solver": "gm_s'
    paths.as_path(f"{RUN}/{guidance_sweep.RESULTS_NAME}").write_text(text)
    assert guidance_sweep.read_results(f"{RUN}/{guidance_sweep.RESULTS_NAME}") == rows
    assert guidance_sweep.read_results(f"{RUN}/absent.jsonl") == []

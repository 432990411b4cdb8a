"""Bad data is named, never trained on silently (issue 14, point 6).

Each case writes real files (tiny ArrayRecord shards through `write_shard` / `encode_record`,
`.npy` latents, JPEGs, npz and JSON caches), damages them the way a user's disk or tool would, and
checks the one-line error names the file and the example, or that a damaged cache is set aside with a
warning and rebuilt.
"""

import importlib.util
import io
import json
import logging
import os
import sys

import numpy as np
import pytest
from helpers.config_files import REPO, load_config
from PIL import Image

from gmflow_jax import tasks
from gmflow_jax.atomic_file import DAMAGED_INFIX, read_json_or_set_aside, write_json_atomic
from gmflow_jax.data import latents
from gmflow_jax.data.imagenet_latents import LATENTS_FILE, LatentData, open_latents
from gmflow_jax.train.task import run_keys

SHAPE = (2, 2, 3)
NUM_CLASSES = 1000


def _write_set(directory, bad=None, num_shards=2, per_shard=4, num_classes=NUM_CLASSES):
    """Shards of example ids 0.. with labels id % 7 and finite latents; `bad(id, latent, label)`
    may return a replacement (latent, label) for one example."""
    os.makedirs(directory, exist_ok=True)
    shards = []
    for j in range(num_shards):
        records = []
        for i in range(j * per_shard, (j + 1) * per_shard):
            latent, label = np.full(SHAPE, 0.5 * i, np.float32), i % 7
            if bad is not None:
                latent, label = bad(i, latent, label)
            records.append(latents.encode_record(latent, label, i))
        name = f"s{j}.array_record"
        latents.write_shard(os.path.join(directory, name), records)
        shards.append({"file": name, "num_records": per_shard, "first_id": j * per_shard})
    latents.write_index(directory, shards, SHAPE, np.float32, num_classes)
    return os.path.join(directory, f"s{num_shards - 1}.array_record")


def _read_all(directory, batch_size=8):
    """Every batch of one epoch through the real grain loader (prefetch threads included)."""
    shards = latents.open_latent_shards(str(directory))
    dataset = latents.latent_dataset(shards, global_batch_size=batch_size, seed=0, num_epochs=1)
    return list(latents.make_iterator(dataset, prefetch=2))


# ----------------------------------------------------------------------------------------------
# Labels and latents of ArrayRecord shards


@pytest.mark.parametrize("label", [NUM_CLASSES + 1, NUM_CLASSES, -1])
def test_out_of_range_label_names_the_shard_and_example(tmp_path, label):
    # num_classes itself is the null (unconditional) label: never a data label.
    shard = _write_set(tmp_path, bad=lambda i, z, y: (z, label) if i == 6 else (z, y))
    with pytest.raises(latents.LatentDataError) as info:
        _read_all(tmp_path)
    message = str(info.value)
    assert shard in message and "example id 6" in message and f"label {label}" in message
    assert f"[0, {NUM_CLASSES})" in message and "\n" not in message


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_latent_names_the_shard_and_example(tmp_path, value):
    def bad(i, z, y):
        if i == 5:
            z = z.copy()
            z[1, 0, 2] = value
        return z, y

    shard = _write_set(tmp_path, bad=bad)
    with pytest.raises(latents.LatentDataError, match="non-finite latent") as info:
        _read_all(tmp_path)
    assert shard in str(info.value) and "example id 5" in str(info.value)


def test_good_shards_read_every_example_with_its_label(tmp_path):
    # The checks must not reject good data: one epoch returns ids 0..7 once, labels id % 7.
    _write_set(tmp_path)
    shards = latents.open_latent_shards(str(tmp_path))
    dataset = latents.latent_dataset(
        shards, global_batch_size=8, seed=0, num_epochs=1, include_ids=True
    )
    (batch,) = list(latents.make_iterator(dataset))
    assert sorted(batch["ids"].tolist()) == list(range(8))
    np.testing.assert_array_equal(batch["labels"], batch["ids"] % 7)
    np.testing.assert_array_equal(batch["x0"][:, 0, 0, 0], 0.5 * batch["ids"])


def test_decode_record_checks_only_when_given_the_class_count():
    record = latents.encode_record(np.zeros(SHAPE, np.float32), NUM_CLASSES, 3)
    _, label, example_id = latents.decode_record(record, SHAPE, np.float32)
    assert (label, example_id) == (NUM_CLASSES, 3)
    with pytest.raises(latents.LatentDataError, match=r"shard x\.ar: example id 3 has label 1000"):
        latents.decode_record(record, SHAPE, np.float32, num_classes=NUM_CLASSES, shard="x.ar")


def test_record_at_the_wrong_position_is_named(tmp_path):
    # A shard listed under the wrong first_id: record position and example id disagree.
    _write_set(tmp_path)
    index = json.load(open(tmp_path / latents.INDEX_FILE))
    index["shards"] = index["shards"][::-1]
    index["shards"][0]["first_id"], index["shards"][1]["first_id"] = 0, 4
    write_json_atomic(str(tmp_path / latents.INDEX_FILE), index)
    with pytest.raises(latents.LatentDataError, match="holds example id") as info:
        _read_all(tmp_path)
    assert "s1.array_record" in str(info.value) or "s0.array_record" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Truncated shards


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_shard_is_named_with_its_path(tmp_path, keep):
    shard = _write_set(tmp_path)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(latents.LatentDataError) as info:
        latents.open_latent_shards(str(tmp_path))
    assert shard in str(info.value) and "truncated or damaged" in str(info.value)


def test_shard_damaged_after_opening_is_named_when_read(tmp_path):
    shard = _write_set(tmp_path)
    shards = latents.open_latent_shards(str(tmp_path))
    with open(shard, "r+b") as f:
        f.truncate(100)
    dataset = latents.latent_dataset(shards, global_batch_size=8, seed=0, num_epochs=1)
    with pytest.raises(latents.LatentDataError) as info:
        list(latents.make_iterator(dataset, prefetch=0))
    assert shard in str(info.value)


# ----------------------------------------------------------------------------------------------
# Class count of the index against the model


def test_index_class_count_must_equal_the_model_class_count(tmp_path):
    _write_set(tmp_path, num_classes=10)
    shards = latents.open_latent_shards(str(tmp_path))
    shards.check_num_classes(10)
    with pytest.raises(latents.LatentDataError) as info:
        shards.check_num_classes(1000)
    message = str(info.value)
    assert "num_classes=10" in message and "config.model.num_classes=1000" in message
    assert str(tmp_path / latents.INDEX_FILE) in message


def test_imagenet_task_refuses_shards_of_another_class_count(tmp_path):
    # The tiny ImageNet config: 8x8x4 latents, 1000 classes; the shards say 5.
    config = load_config("imagenet256", "tiny")
    records = [latents.encode_record(np.zeros((8, 8, 4), np.float32), i % 5, i) for i in range(4)]
    latents.write_shard(str(tmp_path / "s0.array_record"), records)
    latents.write_index(
        str(tmp_path), [{"file": "s0.array_record", "num_records": 4, "first_id": 0}], (8, 8, 4),
        np.float32, 5,
    )  # fmt: skip
    config.data.source, config.data.path = "files", str(tmp_path)
    with pytest.raises(latents.LatentDataError) as info:
        tasks.make_task(config, run_keys(config.seed))
    message = str(info.value)
    assert "num_classes=5" in message and f"config.model.num_classes={NUM_CLASSES}" in message


# ----------------------------------------------------------------------------------------------
# Memory-mapped .npy latents


def test_npy_non_finite_latent_names_the_file_and_example(tmp_path):
    z = np.ones((6, *SHAPE), np.float32)
    z[4, 0, 1, 2] = np.nan
    np.save(tmp_path / LATENTS_FILE, z)
    np.save(tmp_path / "labels.npy", np.arange(6) % 3)
    data = open_latents(str(tmp_path), SHAPE, num_classes=3)
    assert isinstance(data, LatentData)
    with pytest.raises(latents.LatentDataError) as info:
        data.batch(seed=0, step=0, batch_size=6)
    assert str(tmp_path / LATENTS_FILE) in str(info.value) and "example 4" in str(info.value)


@pytest.mark.parametrize("label", [3, -1])
def test_npy_out_of_range_label_names_the_file_and_example(tmp_path, label):
    np.save(tmp_path / LATENTS_FILE, np.ones((6, *SHAPE), np.float32))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, label, 0, 1]))
    with pytest.raises(latents.LatentDataError, match=f"example 3 has label {label}"):
        open_latents(str(tmp_path), SHAPE, num_classes=3)


# ----------------------------------------------------------------------------------------------
# The preparation tool


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "prepare_imagenet_latents_bad", os.path.join(REPO, "tools", "prepare_imagenet_latents.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_prepare_tool_names_an_undecodable_image(tmp_path, damage):
    tool = _load_tool()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(2):
            pixels = np.random.default_rng(k).integers(0, 255, (64, 64, 3), np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{k}.jpg", quality=95)
    bad = tmp_path / "b" / "1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"hello")
    source = tool.FolderSource(tool.SourceSpec(kind="folder", input_dir=str(tmp_path)))
    image, label = source.get(0)
    assert image.size == (64, 64) and label == 0
    with pytest.raises(tool.BadImageError) as info:
        source.get(3)
    assert str(bad) in str(info.value) and "example id 3" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Damaged caches: set aside and rebuilt


def test_damaged_json_is_set_aside_with_a_warning(tmp_path, caplog):
    path = tmp_path / "train_log.json"
    write_json_atomic(str(path), {"steps": [1, 2]})
    assert read_json_or_set_aside(str(path), []) == {"steps": [1, 2]}
    assert read_json_or_set_aside(str(tmp_path / "absent.json"), []) == []
    text = path.read_bytes()
    for damaged in (text[: len(text) // 2], b"\xff\xfe\x00garbage"):
        path.write_bytes(damaged)
        with caplog.at_level(logging.WARNING):
            assert read_json_or_set_aside(str(path), []) == []
        assert not path.exists()
        assert any("train_log.json" in r.getMessage() for r in caplog.records)
    aside = sorted(p for p in os.listdir(tmp_path) if DAMAGED_INFIX in p)
    assert len(aside) == 2 and all(p.startswith("train_log.json.damaged.") for p in aside)
    assert {(tmp_path / p).read_bytes() for p in aside} == {text[: len(text) // 2], damaged}


def test_damaged_digits_classifier_cache_is_set_aside_and_rebuilt(tmp_path, caplog):
    from gmflow_jax.eval.digits import classifier_cache_path, load_or_train_classifier

    path = classifier_cache_path(str(tmp_path), 8)
    with open(path, "wb") as f:  # a cache cut short by a full disk: a broken zip
        f.write(io.BytesIO(b"PK\x03\x04" + b"\x00" * 40).getvalue())
    with caplog.at_level(logging.WARNING):
        model, accuracy = load_or_train_classifier(str(tmp_path), 8)
    assert accuracy > 0.9
    assert any("digits_classifier" in r.getMessage() for r in caplog.records)
    aside = [p for p in os.listdir(tmp_path) if DAMAGED_INFIX in p]
    assert len(aside) == 1
    # The rebuilt cache loads without training again: same accuracy, no new file set aside.
    _, again = load_or_train_classifier(str(tmp_path), 8)
    assert again == accuracy
    assert [p for p in os.listdir(tmp_path) if DAMAGED_INFIX in p] == aside

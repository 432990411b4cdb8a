"""Tests of the ArrayRecord latent shards, the grain loader and tools/prepare_imagenet_latents.py.

The loader is checked against brute-force bookkeeping of example ids (every example once per epoch,
host splits that reassemble the single-host batch, an iterator restored from a checkpoint that
continues exactly); the preparation tool against exact pixel oracles of the ADM crop, a direct VAE
computation of one latent, and its resume behaviour.
"""

import importlib.util
import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.data import latents
from gmflow_jax.models.vae import VAEConfig, abstract_vae_params, load_vae, pixels_from_uint8

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (4, 4, 2)


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "prepare_imagenet_latents", os.path.join(REPO, "tools", "prepare_imagenet_latents.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _write_set(directory, sizes, dtype=np.float32, seed=0):
    """Shards with latent i = i + arange (so values identify the example), labels i % 7."""
    os.makedirs(directory, exist_ok=True)
    shards, first = [], 0
    for j, count in enumerate(sizes):
        records = [
            latents.encode_record(
                (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 0.01 + i).astype(dtype), i % 7, i
            )
            for i in range(first, first + count)
        ]
        name = f"s{j}.array_record"
        latents.write_shard(os.path.join(directory, name), records)
        shards.append({"file": name, "num_records": count, "first_id": first})
        first += count
    latents.write_index(directory, shards, SHAPE, dtype, 7)
    return latents.open_latent_shards(str(directory))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Records and shards


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_record_round_trip(dtype):
    z = np.random.default_rng(0).normal(size=(3, 5, 2)).astype(dtype)
    back, label, example_id = latents.decode_record(
        latents.encode_record(z, 999, 2**40), (3, 5, 2), dtype
    )
    assert (label, example_id) == (999, 2**40) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, z)
    with pytest.raises(ValueError, match="bytes, expected"):
        latents.decode_record(latents.encode_record(z, 1, 1), (3, 5, 3), dtype)
    with pytest.raises(ValueError, match="latent dtype"):
        latents.encode_record(z.astype(np.float64), 1, 1)


def test_open_latent_shards_checks_files_and_counts(tmp_path):
    shards = _write_set(tmp_path / "ok", [3, 4])
    assert shards.num_examples == 7 and shards.latent_shape == SHAPE
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    index["shards"][1]["num_records"] = 5
    (tmp_path / "ok" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds 4 records"):
        latents.open_latent_shards(str(tmp_path / "ok"))
    os.remove(tmp_path / "ok" / "s1.array_record")
    with pytest.raises(FileNotFoundError, match="missing"):
        latents.open_latent_shards(str(tmp_path / "ok"))
    with pytest.raises(FileNotFoundError, match="prepare_imagenet_latents"):
        latents.open_latent_shards(str(tmp_path / "none"))


# ----------------------------------------------------------------------------------------------
# Loader


def test_every_example_appears_once_per_epoch_and_batches_carry_their_records(tmp_path):
    shards = _write_set(tmp_path / "d", [7, 6, 8])  # N = 21
    ds = latents.latent_dataset(shards, global_batch_size=6, seed=3, include_ids=True)
    batches = _take(latents.make_iterator(ds), 14)  # 84 positions = 4 epochs
    ids = np.concatenate([b["ids"] for b in batches])
    epochs = ids.reshape(4, 21)
    for e in range(4):
        assert sorted(epochs[e]) == list(range(21)), e
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled each epoch
    for b in batches:
        assert b["x0"].dtype == np.float32 and b["labels"].dtype == np.int32
        np.testing.assert_array_equal(b["labels"], b["ids"] % 7)
        np.testing.assert_allclose(b["x0"][:, 0, 0, 0], b["ids"].astype(np.float32))
    # deterministic in the seed, different across seeds
    again = _take(latents.make_iterator(ds), 14)
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in again]), ids)
    other = latents.latent_dataset(shards, global_batch_size=6, seed=4, include_ids=True)
    assert not np.array_equal(next(latents.make_iterator(other))["ids"], batches[0]["ids"])


def test_host_shards_reassemble_the_single_host_global_batch(tmp_path):
    shards = _write_set(tmp_path / "d", [5, 9])
    single = latents.make_iterator(
        latents.latent_dataset(shards, global_batch_size=8, seed=1, include_ids=True)
    )
    hosts = [
        latents.make_iterator(
            latents.latent_dataset(
                shards,
                global_batch_size=8,
                seed=1,
                include_ids=True,
                shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=4),
            )
        )
        for i in range(4)
    ]
    for _ in range(5):
        want = next(single)
        parts = [next(h) for h in hosts]
        assert all(p["ids"].shape == (2,) for p in parts)
        for key in ("ids", "labels", "x0"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    rows = latents.latent_dataset(shards, global_batch_size=8, seed=1, rows=np.arange(2, 6))
    np.testing.assert_array_equal(rows[3]["labels"], single_batch_labels(shards, 3)[2:6])
    blocks = latents.latent_dataset(shards, global_batch_size=8, seed=1, rows=[0, 1, 6, 7])
    np.testing.assert_array_equal(blocks[3]["labels"], single_batch_labels(shards, 3)[[0, 1, 6, 7]])
    for bad in ([2, 2], [8], []):
        with pytest.raises(ValueError, match="rows must"):
            latents.latent_dataset(shards, global_batch_size=8, seed=1, rows=bad)
    with pytest.raises(ValueError, match="divisible by the 3 shards"):
        latents.latent_dataset(
            shards,
            global_batch_size=8,
            seed=1,
            shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=3),
        )


def single_batch_labels(shards, step):
    return latents.latent_dataset(shards, global_batch_size=8, seed=1)[step]["labels"]


def test_bfloat16_shards_load_as_float32(tmp_path):
    shards = _write_set(tmp_path / "d", [6], dtype=ml_dtypes.bfloat16)
    batch = latents.latent_dataset(shards, global_batch_size=3, seed=0, include_ids=True)[0]
    assert batch["x0"].dtype == np.float32
    want = np.stack(
        [(np.arange(32).reshape(SHAPE) * 0.01 + i).astype(ml_dtypes.bfloat16) for i in batch["ids"]]
    ).astype(np.float32)
    np.testing.assert_array_equal(batch["x0"], want)


def test_finite_epochs_end_after_the_last_full_batch(tmp_path):
    shards = _write_set(tmp_path / "d", [10])
    ds = latents.latent_dataset(shards, global_batch_size=4, seed=0, num_epochs=2)
    assert len(ds) == 5  # 20 positions / 4


def test_iterator_state_round_trips_through_a_checkpoint(tmp_path):
    shards = _write_set(tmp_path / "d", [9, 4])
    ds = latents.latent_dataset(shards, global_batch_size=4, seed=2, include_ids=True)
    it = latents.make_iterator(ds)
    _take(it, 5)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(5, {"step": jnp.int32(5)}, data_iterator=it)
    expected = _take(it, 4)
    fresh = latents.make_iterator(ds)
    assert latents.iterator_step(fresh) == 0
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        _, extras = ckpt.restore(5, {"step": jnp.int32(0)}, data_iterator=fresh)
    assert "data" in extras and latents.iterator_step(fresh) == 5
    for got, want in zip(_take(fresh, 4), expected, strict=True):
        np.testing.assert_array_equal(got["ids"], want["ids"])
    sought = latents.make_iterator(ds, start_step=5)
    np.testing.assert_array_equal(next(sought)["ids"], expected[0]["ids"])


# ----------------------------------------------------------------------------------------------
# Preparation tool: crop, flip, end to end


def test_center_crop_of_a_2x2_block_image_is_its_block_means():
    rs = np.random.default_rng(0)
    blocks = rs.integers(0, 64, size=(16, 16, 3)).astype(np.uint8) * 4
    image = np.repeat(np.repeat(blocks, 2, 0), 2, 1)  # 32 x 32, constant 2x2 blocks
    out = tool.center_crop_arr(Image.fromarray(image), 16)
    np.testing.assert_array_equal(out, blocks)  # one box halving, then no resize, no crop


def test_center_crop_shape_and_centering():
    # a 90 x 40 (W x H) image whose columns encode their x coordinate
    cols = np.tile((np.arange(90) * 2).astype(np.uint8)[None, :, None], (40, 1, 3))
    out = tool.center_crop_arr(Image.fromarray(cols), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # 90 x 40 -> box halving (short side 40 >= 32) -> 45 x 20 -> bicubic to 36 x 16 -> crop x in [10, 26)
    half = np.asarray(
        Image.fromarray(cols)
        .resize((45, 20), Image.Resampling.BOX)
        .resize((36, 16), Image.Resampling.BICUBIC)
    )
    np.testing.assert_array_equal(out, half[:, 10:26])
    assert out[:, 0, 0].mean() < out[:, -1, 0].mean()  # left part left, right part right


def test_flip_is_drawn_once_per_image_from_the_seed():
    flips = [tool.flip_decision(0, i) for i in range(2000)]
    assert flips == [tool.flip_decision(0, i) for i in range(2000)]
    assert abs(np.mean(flips) - 0.5) < 4 * 0.5 / np.sqrt(2000)  # 4 sigma
    assert flips != [tool.flip_decision(1, i) for i in range(2000)]
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    i = flips.index(True)
    np.testing.assert_array_equal(tool.preprocess(image, 16, 0, i), np.asarray(image)[:, ::-1])
    np.testing.assert_array_equal(tool.preprocess(image, 16, 0, flips.index(False)), image)


TINY_VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vae")
    rs = np.random.default_rng(3)  # numpy weights: compiling a random initializer is slow on CPU
    params = {}
    for key, shape in abstract_vae_params(TINY_VAE).items():
        if key.endswith(".scale"):
            params[key] = np.ones(shape.shape, np.float32)
        elif key.endswith(".bias"):
            params[key] = rs.normal(0.0, 0.02, shape.shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape.shape[:-1]))
            params[key] = rs.normal(0.0, fan_in**-0.5, shape.shape).astype(np.float32)
    np.savez(directory / "vae_params.npz", **params)
    (directory / "vae_config.json").write_text(json.dumps(TINY_VAE.to_diffusers()))
    return directory


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rs = np.random.default_rng(1)
    sizes = [(40, 30), (20, 24), (33, 17), (16, 16)]
    for name in ["n02", "n01", "n03"]:
        os.makedirs(root / name)
        for k, (w, h) in enumerate(sizes):
            pixels = rs.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{k}.png")
        (root / name / "notes.txt").write_text("not an image")
    return root


def _tool_args(image_folder, vae_dir, out, workers):
    return [
        "--source=folder",
        f"--input_dir={image_folder}",
        f"--vae_dir={vae_dir}",
        f"--output_dir={out}",
        "--image_size=16",
        "--num_shards=3",
        f"--workers={workers}",
        "--batch_size=3",
        "--seed=5",
    ]


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA:CPU options of the compiles here (flags of the tool's processes): about half the compile time."""


def _run_tool(tmp_path, *args):
    """Run the tool as a script; its processes share a persistent compilation cache."""
    flags = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())
    env = dict(
        os.environ,
        XLA_FLAGS=flags,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "prepare_imagenet_latents.py"), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_prepare_tool_end_to_end_with_workers_and_resume(tmp_path, image_folder, vae_dir):
    out = tmp_path / "latents"
    _run_tool(tmp_path, *_tool_args(image_folder, vae_dir, out, 2), "--npy")
    shards = latents.open_latent_shards(str(out))
    assert shards.num_examples == 12 and shards.latent_shape == (8, 8, 4)
    assert len(shards.paths) == 3 and shards.num_classes == 3
    ds = latents.latent_dataset(shards, global_batch_size=12, seed=0, include_ids=True)
    batch = ds[0]
    order = np.argsort(batch["ids"])
    # classes sorted by name: n01 -> 0, n02 -> 1, n03 -> 2; ids in (class, file) order
    np.testing.assert_array_equal(batch["labels"][order], np.repeat([0, 1, 2], 4))
    x0 = batch["x0"][order]
    # oracle for one example: crop + flip + the VAE posterior sample with key fold_in(seed, id)
    example_id = 5
    paths, _, _ = tool.list_image_folder(str(image_folder))
    assert paths[example_id].endswith(os.path.join("n02", "img1.png"))
    with Image.open(paths[example_id]) as image:
        pixels = tool.preprocess(image, 16, 5, example_id)
    graphdef, params = nnx.split(load_vae(str(vae_dir / "vae_params.npz")))
    encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    x = pixels_from_uint8(pixels[None])
    mean, logvar = encode.lower(params, x).compile(compiler_options=FAST_COMPILE)(params, x)
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(5), example_id), (8, 8, 4))
    want = (mean[0] + jnp.exp(0.5 * logvar[0]) * noise) * TINY_VAE.scaling_factor
    np.testing.assert_allclose(x0[example_id], np.asarray(want), rtol=1e-4, atol=1e-5)
    npy = np.load(out / "latents.npy")
    np.testing.assert_array_equal(npy, x0)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), np.repeat([0, 1, 2], 4))

    # resume: a missing shard and a stale temporary file; the finished shards are not rewritten
    before = {p: (os.path.getmtime(p), open(p, "rb").read()) for p in shards.paths}
    os.remove(shards.paths[1])
    stale = shards.paths[1] + ".tmp-99999"
    open(stale, "wb").write(b"partial")
    _run_tool(tmp_path, *_tool_args(image_folder, vae_dir, out, 0))
    assert not os.path.exists(stale)
    for p, (mtime, data) in before.items():
        assert open(p, "rb").read() == data, p  # the rewritten shard is identical too
        if p != shards.paths[1]:
            assert os.path.getmtime(p) == mtime, p


def test_prepare_tool_reads_tfds_imagenet_through_its_data_source(tmp_path, vae_dir):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "latents"
    with tfds.testing.mock_data(num_examples=6):
        assert tool.main(
            ["--source=tfds", f"--vae_dir={vae_dir}", f"--output_dir={out}", "--image_size=16",
             "--num_shards=2", "--workers=0", "--batch_size=3"]
        ) == 0  # fmt: skip
        source = tool.open_source(tool.SourceSpec(kind="tfds"))
        labels = [source.get(i)[1] for i in range(6)]
    shards = latents.open_latent_shards(str(out))
    assert shards.num_examples == 6 and shards.num_classes == 1000
    batch = latents.latent_dataset(shards, global_batch_size=6, seed=0, include_ids=True)[0]
    np.testing.assert_array_equal(batch["labels"], np.asarray(labels)[batch["ids"]])
    assert np.all(np.isfinite(batch["x0"]))

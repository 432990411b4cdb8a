"""The ImageNet-256 latent task: the paper's config, the latent loaders, the tiny run (`docs/math.md` §4.8, §8.1).

The tiny variant (`configs/imagenet256.py:tiny`: bf16 compute, C = 4, synthetic latents) runs through
the real entry point, `python -m gmflow_jax.main`, in a subprocess with 8 fake devices: the pod-scale
path (mesh fsdp = 8) trains, evaluates (one guided GM-SDE 2 sampling call with spectral sampling)
and resumes.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.config_files import REPO, load_config
from helpers.sharded_run import FAST_COMPILE_FLAGS

from gmflow_jax import tasks
from gmflow_jax.data import latents as shards_lib
from gmflow_jax.data.imagenet_latents import (
    LABELS_FILE,
    LATENTS_FILE,
    open_latents,
    synthetic_latents,
)
from gmflow_jax.models.gm_dit import LOGICAL_AXIS_NAMES
from gmflow_jax.parallel.mesh import make_mesh
from gmflow_jax.run import train_and_evaluate
from gmflow_jax.tasks.image import row_solver_config
from gmflow_jax.train.reporting import TRAIN_LOG_FILE
from gmflow_jax.train.task import BatchLayout, run_keys


def _load_config(variant: str):
    return load_config("imagenet256", variant)


def _main(workdir, cache_dir, *overrides):
    """Run `python -m gmflow_jax.main --config=configs/imagenet256.py:tiny` on 8 fake devices."""
    cmd = [
        sys.executable, "-m", "gmflow_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'imagenet256.py')}:tiny",
        f"--workdir={workdir}", *overrides,
    ]  # fmt: skip
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_main_tiny_trains_bf16_on_the_fsdp_mesh_evaluates_and_resumes(tmp_path):
    """`python -m gmflow_jax.main --config=configs/imagenet256.py:tiny` (bf16 compute, C = 4,
    synthetic latents) on 8 fake devices: the pod-scale path (mesh data=1, fsdp=-1 -> 8, sharded
    bf16 train steps), then the task's evaluation (one guided GM-SDE 2 sampling call with spectral
    sampling: metrics.json, samples.npz); rerunning with more steps resumes from the workdir."""
    workdir = tmp_path / "run"
    out = _main(workdir, tmp_path / "xla_cache", "--config.train.num_steps=2")
    assert "fresh initialization" in out and "'fsdp': 8" in out
    payload = json.loads((workdir / "metrics.json").read_text())
    assert payload["config"]["model"]["dtype"] == "bfloat16"
    train = payload["train"]
    assert train["steps"] == 2 and train["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert math.isfinite(train["final_loss"]) and not train["preempted"]
    (r,) = payload["results"]
    assert (r["row"], r["nfe"], r["w"], r["spectral"]) == ("gm_sde_2", 2, 0.3, True)
    assert r["metrics"]["nonfinite_rate"] == 0.0 and r["metrics"]["std"] > 0
    with np.load(workdir / "samples.npz") as saved:
        assert saved["gm_sde_2_nfe2_w0.3"].shape == (4, 8, 8, 4)
        assert saved["labels"].shape == (4,)
    assert json.loads((workdir / "config.json").read_text())["model"]["num_gaussians"] == 8
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    # the same command with more steps resumes from the workdir's checkpoint
    out = _main(
        workdir, tmp_path / "xla_cache", "--config.train.num_steps=3", "--config.eval.enabled=False"
    )
    assert "resumed from step 2" in out and "steps 2->3" in out
    sessions = json.loads((workdir / TRAIN_LOG_FILE).read_text())["sessions"]
    assert [(s["start_step"], s["end_step"]) for s in sessions] == [(0, 2), (2, 3)]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]


# ----------------------------------------------------------------------------------------------
# ImageNet latents: the loader, and the full config without latents


def test_full_imagenet_config_without_latents_stops_with_the_prepare_command(tmp_path):
    config = _load_config("")
    config.data.path = str(tmp_path / "no_latents_here")
    with pytest.raises(FileNotFoundError, match=r"tools/prepare_imagenet_latents\.py"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # stopped before any model or workdir work


def test_full_imagenet_config_is_the_paper_recipe():
    c = _load_config("")
    assert (c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.patch_size) == (
        28,
        1152,
        16,
        2,
    )
    assert c.model.num_gaussians == 8 and c.model.dtype == "bfloat16"
    assert tuple(c.model.spectrum_net.base_size) == (4, 32, 32)
    assert (c.train.batch_size, c.train.num_steps, c.train.trans_ratio) == (4096, 200_000, 0.5)
    assert c.train.prob_class == 0.9 and c.train.weight_scale == 2.0
    o = c.train.optimizer
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.warmup_iters, o.warmup_ratio) == (
        2e-4,
        0.9,
        0.95,
        0.05,
        1000,
        0.001,
    )
    assert (o.grad_clip_norm, o.clip_begin, o.skip_nonfinite) == (10.0, 1000, True)
    e = c.train.ema
    assert (e.policy, e.ema_kimg, e.ema_rampup, e.batch_size) == ("rampup", 30000.0, 0.05, 4096)
    cfg = row_solver_config(
        c.sample.gm_solvers[0],
        c.sample.gm_nfes[0],
        c.sample.guidance_scales[0],
        null_label=1000,
        substeps_total=c.sample.gm_ode_substeps_total,
    )
    assert (cfg.solver, cfg.order, cfg.num_steps, cfg.num_substeps) == ("gm_ode", 2, 16, 8)
    assert c.checkpoint.every_steps == 1000
    assert {name for name, _ in c.mesh.rules} == set(LOGICAL_AXIS_NAMES)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)


def test_prepared_latents_round_trip_and_batches_resume_exactly(tmp_path):
    data = synthetic_latents(50, (4, 4, 2), num_classes=5, seed=1)
    np.save(tmp_path / LATENTS_FILE, data.latents.astype(np.float16))
    np.save(tmp_path / LABELS_FILE, data.labels)
    opened = open_latents(str(tmp_path), (4, 4, 2), num_classes=5)
    x, y = opened.batch(seed=3, step=7, batch_size=16)  # straddles epochs 2 and 3
    it = opened.batches(seed=3, batch_size=16, start_step=5)
    next(it), next(it)
    x2, y2 = next(it)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    rows = data.latents.astype(np.float16).astype(np.float32)  # what was stored
    assert x.dtype == np.float32 and y.dtype == np.int32
    for xi, yi in zip(x, y, strict=True):
        match = np.flatnonzero((rows == xi).all(axis=(1, 2, 3)))
        assert match.size == 1 and data.labels[match[0]] == yi
    # every latent appears exactly once per epoch
    seen = np.concatenate([opened.batch(3, s, 10)[1] for s in range(5)])
    assert np.bincount(seen, minlength=5).tolist() == [10] * 5
    # two processes split the global batch
    a = opened.batch(3, 7, 16, process_index=0, process_count=2)[0]
    b = opened.batch(3, 7, 16, process_index=1, process_count=2)[0]
    np.testing.assert_array_equal(np.concatenate([a, b]), x)
    with pytest.raises(ValueError, match="expects"):
        open_latents(str(tmp_path), (8, 8, 4), num_classes=5)


def test_imagenet_task_reads_arrayrecord_shards_or_npy_files_from_data_path(tmp_path):
    data = synthetic_latents(24, (8, 8, 4), num_classes=1000, seed=0)
    shard_dir, npy_dir = tmp_path / "shards", tmp_path / "npy"
    shard_dir.mkdir(), npy_dir.mkdir()
    records = [shards_lib.encode_record(data.latents[i], int(data.labels[i]), i) for i in range(24)]
    shards_lib.write_shard(str(shard_dir / "s0.array_record"), records)
    shards_lib.write_index(
        str(shard_dir),
        [{"file": "s0.array_record", "num_records": 24, "first_id": 0}],
        (8, 8, 4),
        np.float32,
        1000,
    )
    np.save(npy_dir / LATENTS_FILE, data.latents)
    np.save(npy_dir / LABELS_FILE, data.labels)
    for path in (shard_dir, npy_dir):
        config = _load_config("tiny")
        config.data.source, config.data.path = "files", str(path)
        task = tasks.make_task(config, run_keys(config.seed))
        layout = BatchLayout(make_mesh(), 8, np.arange(8))
        epoch = [next(iter(task.batches(s, layout))) for s in range(3)]  # 3 x 8 = one epoch of 24
        x = np.concatenate([b["x0"] for b in epoch])
        y = np.concatenate([b["labels"] for b in epoch])
        assert x.shape == (24, 8, 8, 4) and x.dtype == np.float32
        order = np.argsort(x[:, 0, 0, 0])  # every latent exactly once, with its own label
        np.testing.assert_array_equal(x[order], data.latents[np.argsort(data.latents[:, 0, 0, 0])])
        np.testing.assert_array_equal(y[order], data.labels[np.argsort(data.latents[:, 0, 0, 0])])

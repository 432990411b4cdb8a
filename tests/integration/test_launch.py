"""Launch scripts (dry runs print complete command sequences) and cluster detection."""

import os
import pathlib
import shlex
import subprocess

import pytest

from gmflow_jax.parallel.distributed import detect_cluster

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    cmds = _dry("tpu_pod.sh", "--dry-run", "all", env={"BUCKET": "bkt", "ACCELERATOR": "v5p-64"})
    assert [c[:4] for c in cmds] == [
        ["gcloud", "compute", "tpus", "queued-resources"],
        ["gcloud", "compute", "tpus", "queued-resources"],
        ["gcloud", "compute", "tpus", "tpu-vm"],
        ["gcloud", "compute", "tpus", "tpu-vm"],
        ["gcloud", "compute", "tpus", "tpu-vm"],
    ]
    create, describe, setup, train, logs = cmds
    assert create[4] == "create" and "--accelerator-type" in create
    assert create[create.index("--accelerator-type") + 1] == "v5p-64"
    assert describe[4] == "describe"
    for c in (setup, train):
        assert "--worker=all" in c
    setup_cmd = setup[setup.index("--command") + 1]
    assert "pip install -r requirements.txt -e . 'jax[tpu]==0.10.2'" in setup_cmd
    train_cmd = train[train.index("--command") + 1]
    assert "python3 -m gmflow_jax.main --config=configs/imagenet256.py" in train_cmd
    assert "--workdir=gs://bkt/gmflow_imagenet256" in train_cmd
    assert "--worker=0" in logs and "tail -F" in logs[logs.index("--command") + 1]
    delete = _dry("tpu_pod.sh", "--dry-run", "delete", env={"BUCKET": "bkt"})
    assert delete == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "gmflow-pod",
            "--zone",
            "us-east5-a",
            "--force",
            "--quiet",
        ]
    ]


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


def test_slurm_dry_run_prints_two_nodes_by_eight_gpus():
    env = {"SLURM_SUBMIT_DIR": "/repo"}
    cmds = _dry(
        "gpu_slurm.sbatch",
        "--dry-run",
        "--workdir=/shared/run",
        "--config.train.num_steps=7",
        env=env,
    )
    assert len(cmds) == 1
    srun = cmds[0]
    assert srun[:5] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-task=1",
        "--kill-on-bad-exit=1",
    ]
    inner = srun[-1]
    assert inner.startswith("cd /repo && source .venv/bin/activate")
    assert (
        "python -m gmflow_jax.main --config=configs/imagenet256.py --workdir=/shared/run "
        "--config.train.num_steps=7" in inner
    )
    header = (ROOT / "launch/gpu_slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@300" in header and "#SBATCH --requeue" in header


@pytest.mark.parametrize(
    "env,kind",
    [
        ({}, "single"),
        ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}, "single"),
        ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "16"}, "slurm"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "tpu"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            "env",
        ),
    ],
)
def test_cluster_detection(env, kind):
    spec = detect_cluster(env)
    assert spec.kind == kind
    if kind == "env":
        assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("h:1", 2, 1)


def test_cluster_detection_reports_incomplete_settings():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        detect_cluster({}, coordinator_address="h:1")
    assert detect_cluster({}, "127.0.0.1:9", 1, 0).kind == "explicit"

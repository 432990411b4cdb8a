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
    env = {
        "BUCKET": "bkt",
        "ACCELERATOR": "v5p-64",
        "PROVISIONING": "spot",
        "DATA": "gs://data-bkt/in256_latents",
    }
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
    assert (
        "gcsfuse --implicit-dirs -o ro --metadata-cache-ttl-secs=-1 data-bkt /mnt/gmflow-data"
        in setup_cmd
    )
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


# --- fake cluster tools ---------------------------------------------------------------------------

FAKE_GCLOUD = r'''#!PYTHON
"""Fake gcloud: records its argv; queued resources follow the scenario, one entry per created slice."""
import json, os, sys

d = os.environ["FAKE_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
scenario = json.load(open(os.path.join(d, "scenario.json")))
path = os.path.join(d, "world.json")
world = json.load(open(path)) if os.path.exists(path) else {"slice": -1, "alive": False, "n": {}}


def next_of(kind):
    seq = scenario["slices"][world["slice"]][kind]
    i = world["n"].get(kind, 0)
    world["n"][kind] = i + 1
    return seq[min(i, len(seq) - 1)]


out, rc = "", 0
if args[:4] == ["compute", "tpus", "queued-resources", "create"]:
    world.update(slice=world["slice"] + 1, alive=True, n={})
elif args[:4] == ["compute", "tpus", "queued-resources", "delete"]:
    world["alive"] = False
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    if world["alive"]:
        out = next_of("states")
    else:
        rc = 1
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "exit_code" in args[-1] and args[-1].startswith("cat"):
    out = next_of("polls")
json.dump(world, open(path, "w"))
if out:
    print(out)
sys.exit(rc)
'''


def _fake_bin(tmp_path, name, source):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(source.replace("#!PYTHON", "#!" + sys.executable))
    exe.chmod(0o755)
    return bindir


def _supervise(tmp_path, slices, *actions, max_retries=3):
    bindir = _fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
    (tmp_path / "scenario.json").write_text(json.dumps({"slices": slices}))
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_DIR": str(tmp_path),
        "BUCKET": "bkt", "PROVISIONING": "spot", "MAX_RETRIES": str(max_retries),
        "POLL_S": "0", "WAIT_POLL_S": "0",
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "launch/tpu_pod.sh"), *(actions or ("supervise",))],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return proc, calls


def _kinds(calls):
    """create / delete / setup / run / poll, in order (describes left out); argv without "gcloud"."""
    out = []
    for c in calls:
        if c[2] == "queued-resources" and c[3] in ("create", "delete"):
            out.append(c[3])
        elif c[2] == "tpu-vm":
            cmd = c[-1]
            out.append("setup" if "uv venv" in cmd else "poll" if cmd.startswith("cat") else "run")
    return out


def test_supervise_recreates_a_preempted_slice_and_reruns_the_same_command(tmp_path):
    slices = [
        {"states": ["ACTIVE", "ACTIVE", "SUSPENDED"], "polls": ["running"]},
        {"states": ["PROVISIONING", "ACTIVE"], "polls": ["running", "0"]},
    ]
    proc, calls = _supervise(tmp_path, slices)
    assert proc.returncode == 0, proc.stderr
    assert _kinds(calls) == [
        "create", "setup", "run", "poll",  # first slice, then SUSPENDED (spot preemption)
        "delete", "create", "setup", "run", "poll", "poll",  # recreated; the trainer exits 0
    ]  # fmt: skip
    runs = [c for c in calls if c[2] == "tpu-vm" and _kinds([c]) == ["run"]]
    assert runs[0] == runs[1]  # the same command: it resumes from the checkpoint in WORKDIR
    assert all("--spot" in c for c in calls if c[3] == "create")
    assert "restart 1 of 3" in proc.stdout and "finished (exit 0) after 1 restarts" in proc.stdout


def test_supervise_stops_at_the_retry_limit(tmp_path):
    proc, calls = _supervise(tmp_path, [{"states": ["FAILED"], "polls": []}] * 3, max_retries=2)
    assert proc.returncode == 4
    assert "retry limit reached (2 restarts)" in proc.stderr
    assert _kinds(calls) == ["create", "delete", "create", "delete", "create"]


def test_supervise_reruns_a_crashed_trainer_on_the_live_slice(tmp_path):
    proc, calls = _supervise(tmp_path, [{"states": ["ACTIVE"], "polls": ["running", "1", "0"]}])
    assert proc.returncode == 0, proc.stderr
    assert _kinds(calls) == ["create", "setup", "run", "poll", "poll", "run", "poll"]
    assert "exited with status 1 on an ACTIVE slice" in proc.stdout


def test_supervise_takes_over_an_active_slice_without_recreating_it(tmp_path):
    bindir = _fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
    (tmp_path / "world.json").write_text(json.dumps({"slice": 0, "alive": True, "n": {}}))
    proc, calls = _supervise(tmp_path, [{"states": ["ACTIVE"], "polls": ["0"]}])
    assert bindir.exists() and proc.returncode == 0, proc.stderr
    assert _kinds(calls) == ["setup", "run", "poll"]


@pytest.mark.parametrize("final", ["FAILED", "SUSPENDED"])
def test_wait_exits_with_a_message_on_failed_or_suspended(tmp_path, final):
    slices = [{"states": ["WAITING_FOR_RESOURCES", "PROVISIONING", final], "polls": []}]
    proc, calls = _supervise(tmp_path, slices, "create", "wait")
    assert proc.returncode == 3
    assert f"queued resource gmflow-pod is {final}, it will not become ACTIVE" in proc.stderr
    assert proc.stdout.count("waiting for queued resource") == 2


def test_the_worker_run_command_logs_and_records_the_exit_code(tmp_path):
    """Run the `run` action's remote command here with bash: fake venv python, curl and gcloud."""
    (train,) = _dry("tpu_pod.sh", "--dry-run", "run", env={"BUCKET": "bkt", "LOG_SYNC_S": "3600"})
    remote = train[train.index("--command") + 1]
    home = tmp_path / "home"
    (home / "gmflow_jax").mkdir(parents=True)
    venv_bin = home / "gmflow_venv" / "bin"
    venv_bin.mkdir(parents=True)
    py = venv_bin / "python"
    py.write_text(
        '#!/bin/bash\necho "trainer $* LIBTPU=$LIBTPU_INIT_ARGS CACHE=$JAX_COMPILATION_CACHE_DIR"\n'
        "exit 7\n"
    )
    py.chmod(0o755)
    bindir = _fake_bin(tmp_path, "curl", "#!/bin/bash\necho 3\n")
    _fake_bin(tmp_path, "gcloud", '#!/bin/bash\necho "$*" >> "$FAKE_DIR/gcloud.txt"\n')
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(home), "FAKE_DIR": str(tmp_path)}
    subprocess.run(["bash", "-c", remote], env=env, check=True, timeout=30)
    exit_code = home / "gmflow_run" / "exit_code"
    deadline = time.time() + 20
    while not exit_code.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert exit_code.read_text().strip() == "7"
    log = (home / "gmflow_run" / "worker-3.log").read_text()
    assert "trainer -m gmflow_jax.main --config=configs/imagenet256.py" in log
    assert "LIBTPU=--xla_tpu_enable_async_collective_fusion=true" in log
    assert f"CACHE={home}/.cache/gmflow_jax_xla" in log
    copied = (tmp_path / "gcloud.txt").read_text()
    assert (
        f"storage cp -q {home}/gmflow_run/worker-3.log gs://bkt/gmflow_imagenet256/logs/worker-3.log"
        in copied
    )


# --- SLURM ----------------------------------------------------------------------------------------


def test_slurm_dry_run_prints_one_process_per_node_owning_its_gpus():
    cmds = _dry(
        "gpu_slurm.sbatch", "--dry-run", "--workdir=/shared/run", "--config.train.num_steps=7",
        env={"SLURM_SUBMIT_DIR": "/repo", "VENV": "/"},
    )  # fmt: skip
    (srun,) = cmds
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    inner = srun[-1]
    assert inner.startswith("cd /repo && source //bin/activate && export JAX_LOCAL_DEVICE_IDS=")
    assert "JAX_PLATFORMS=cuda" in inner
    assert (
        "exec python -m gmflow_jax.main --config=configs/imagenet256.py --workdir=/shared/run "
        "--config.train.num_steps=7" in inner
    )
    header = (ROOT / "launch/gpu_slurm.sbatch").read_text()
    for line in ("--signal=B:USR1@300", "--requeue", "--ntasks-per-node=1", "--gpus-per-node=8"):
        assert f"#SBATCH {line}\n" in header


def test_slurm_dry_run_installs_the_gpu_extra_when_the_venv_is_missing(tmp_path):
    cmds = _dry("gpu_slurm.sbatch", "--dry-run", "--workdir=/w",
                env={"SLURM_SUBMIT_DIR": "/repo", "VENV": str(tmp_path / "v")})  # fmt: skip
    assert cmds[0] == ["python3.11", "-m", "venv", str(tmp_path / "v")]
    assert cmds[1] == [str(tmp_path / "v/bin/pip"), "install", "-e", "/repo[gpu]"]


def test_slurm_xla_flags_are_known_to_this_xla():
    """XLA aborts on an unknown flag; the GPU flags are parsed on every backend, so CPU checks them."""
    text = (ROOT / "launch/gpu_slurm.sbatch").read_text()
    flags = text.split("XLA_FLAGS=${XLA_FLAGS:-")[1].split("}\n")[0]
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as j; print(j.ones(2).sum())"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "2.0", out.stderr[-500:]


def test_jax_slurm_detection_keeps_the_launchers_local_device_ids(monkeypatch):
    """JAX's SLURM detection would pin each process to GPU SLURM_LOCALID; the launcher's explicit ids
    (JAX_LOCAL_DEVICE_IDS, read by jax.distributed.initialize) take precedence."""
    from jax._src.clusters import ClusterEnv

    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ids = [0, 1, 2, 3, 4, 5, 6, 7]
    addr, n, pid, local = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, ids, None, None
    )
    assert (addr.split(":")[0], n, pid, list(local)) == ("gpu003", 2, 1, ids)
    *_, default = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None
    )
    assert list(default) == [0]  # what one process per node would get without the override


FAKE_SRUN = r"""#!/bin/bash
# Fake srun: record the call; MODE ok runs the trailing `bash -c` command, fail exits 3,
# time_limit waits for SIGTERM (the trainer's checkpoint-and-exit) and exits 0.
printf '%s\n' "$@" > "$FAKE_DIR/srun_args.txt"
case "$FAKE_MODE" in
  ok) shift $(( $# - 1 )); SLURM_GPUS_ON_NODE=4 bash -c "$1" ;;
  fail) exit 3 ;;
  time_limit)
    trap 'echo TERM >> "$FAKE_DIR/srun_signals.txt"; exit 0' TERM
    touch "$FAKE_DIR/srun_started"
    while true; do sleep 0.05; done ;;
esac
"""

FAKE_SCONTROL = '#!/bin/bash\necho "$*" >> "$FAKE_DIR/scontrol.txt"\n'


def _sbatch(tmp_path, mode):
    bindir = _fake_bin(tmp_path, "srun", FAKE_SRUN)
    _fake_bin(tmp_path, "scontrol", FAKE_SCONTROL)
    _fake_bin(
        tmp_path, "python",
        "#!/bin/bash\necho \"$* JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS "
        "JAX_PLATFORMS=$JAX_PLATFORMS\" > \"$FAKE_DIR/trainer.txt\"\n",
    )  # fmt: skip
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text("")
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "FAKE_MODE": mode,
        "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT),
        "VENV": str(venv), "HOME": str(tmp_path),
    }  # fmt: skip
    return subprocess.Popen(
        ["bash", str(ROOT / "launch/gpu_slurm.sbatch"), f"--workdir={tmp_path}/run"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip


def test_slurm_time_limit_checkpoints_then_requeues(tmp_path):
    proc = _sbatch(tmp_path, "time_limit")
    deadline = time.time() + 20
    while not (tmp_path / "srun_started").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch shell
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "srun_signals.txt").read_text() == "TERM\n"  # forwarded to the trainers
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 42\n"
    assert "requeueing job 42" in out


def test_slurm_finished_or_failed_trainers_are_not_requeued(tmp_path):
    ok = _sbatch(tmp_path, "ok")
    ok.communicate(timeout=30)
    assert ok.returncode == 0
    trainer = (tmp_path / "trainer.txt").read_text()
    assert "-m gmflow_jax.main --config=configs/imagenet256.py" in trainer
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3 JAX_PLATFORMS=cuda" in trainer  # 4 GPUs on the node
    failed = _sbatch(tmp_path, "fail")
    failed.communicate(timeout=30)
    assert failed.returncode == 3
    assert not (tmp_path / "scontrol.txt").exists()

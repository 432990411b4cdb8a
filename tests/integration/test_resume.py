"""Crash / preemption / corruption recovery of a sharded training job (tests/helpers/sharded_run.py).

The jobs run the real training loop of `python -m gmflow_jax.main` (`train.loop.train`,
through the thin wrapper tests/helpers/sharded_run.py) on a mesh data=2 x fsdp=2 of 4 fake CPU devices. The
oracle is one uninterrupted run (A); three interrupted jobs must reproduce it bit for bit (losses,
example ids per step, final parameters):

* B: killed with SIGKILL at a random step, then rerun;
* C: sent SIGTERM at a random step: it must checkpoint that step and exit with status 0; the rerun
  resumes exactly there;
* D: A's checkpoints with the newest step (the last) truncated: the rerun falls back to the previous
  step (moving the corrupt one aside) and recomputes the rest.

The jobs share a persistent XLA compilation cache, so only A compiles; B, C and D run concurrently.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers.sharded_run import launch, write_tiny_latents

STEPS = 6
BATCH = 8
NUM_EXAMPLES = 24  # 3 steps per epoch: the run covers exactly 2 epochs
SAVE_EVERY = 2
TIMEOUT = 300
RNG = np.random.default_rng(20261128)
# SIGKILL / SIGTERM arrive once this step is logged and a checkpoint is committed (so that there is
# something to resume)
KILL_STEP = int(RNG.integers(2, STEPS - 2))
TERM_STEP = int(RNG.integers(2, STEPS - 2))


def _start(root, name, steps=STEPS, delay=0.0):
    return launch(
        root, name, root / f"{name}.stderr", devices=4, steps=steps, batch_size=BATCH,
        save_every=SAVE_EVERY, extra=(f"--step_delay={delay}", "--mesh=2,2,1"),
    )  # fmt: skip


def _log(root, name):
    path = root / f"{name}.log.p0"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def _last_step(root, name):
    steps = [e["step"] for e in _log(root, name) if e["event"] == "step"]
    return max(steps) if steps else -1


def _wait(proc, root, name):
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stderr = (root / f"{name}.stderr").read_text()[-3000:]
        raise AssertionError(f"{name} timed out:\n{stderr}") from None


def _committed(root, name):
    directory = root / name / "checkpoints"
    return (
        sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if directory.exists() else []
    )


def _interrupt_at(procs, root, targets):
    """Send each job its signal once its log shows the target step and a checkpoint is committed.

    Returns {name: committed steps right after the signal}.
    """
    pending = dict(targets)
    committed = {}
    deadline = time.time() + TIMEOUT
    while pending:
        for name, (step, sig) in list(pending.items()):
            if _last_step(root, name) >= step and _committed(root, name):
                procs[name].send_signal(sig)
                committed[name] = _committed(root, name)
                del pending[name]
            elif procs[name].poll() is not None:
                raise AssertionError(
                    f"{name} ended before step {step}:\n"
                    + (root / f"{name}.stderr").read_text()[-3000:]
                )
        if time.time() > deadline:
            raise AssertionError(f"jobs {sorted(pending)} never reached their steps")
        time.sleep(0.02)
    return committed


def _truncate_arrays(step_dir):
    count = 0
    for dirpath, _, files in os.walk(step_dir):
        if os.path.basename(dirpath) == "d":  # orbax/tensorstore array chunk files
            for f in files:
                with open(os.path.join(dirpath, f), "r+b") as fh:
                    fh.truncate(3)
                count += 1
    assert count > 0, f"no array files under {step_dir}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_tiny_latents(str(root / "data"), NUM_EXAMPLES, [7, 8, 9])
    procs = {}
    try:
        procs["A"] = _start(root, "A")
        assert _wait(procs["A"], root, "A") == 0, (root / "A.stderr").read_text()[-3000:]
        procs["B"] = _start(root, "B", delay=0.25)
        procs["C"] = _start(root, "C", delay=0.25)
        shutil.copytree(root / "A" / "checkpoints", root / "D" / "checkpoints")
        committed_d = _committed(root, "D")
        _truncate_arrays(root / "D" / "checkpoints" / str(committed_d[-1]))
        procs["D"] = _start(root, "D")
        at_signal = _interrupt_at(
            procs, root, {"B": (KILL_STEP, signal.SIGKILL), "C": (TERM_STEP, signal.SIGTERM)}
        )
        rc = {name: _wait(procs[name], root, name) for name in "BCD"}
        ckpt_c = sorted(int(p) for p in os.listdir(root / "C" / "checkpoints") if p.isdigit())
        logs_first = {name: _log(root, name) for name in "BC"}
        for name in "BC":
            procs[name] = _start(root, name)
        rc2 = {name: _wait(procs[name], root, name) for name in "BC"}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {
        "root": root,
        "rc": rc,
        "rc2": rc2,
        "committed_d": committed_d,
        "committed_b": at_signal["B"],
        "committed_c": ckpt_c,
        "first": logs_first,
        "logs": {name: _log(root, name) for name in "ABCD"},
        "final": {name: dict(np.load(root / f"{name}.npz")) for name in "ABCD"},
    }


def _steps(log):
    """{step: [entries]} of a log (an entry per run that executed the step)."""
    out = {}
    for e in log:
        if e["event"] == "step":
            out.setdefault(e["step"], []).append(e)
    return out


def _assert_matches_reference(runs, name):
    ref = {s: e[0] for s, e in _steps(runs["logs"]["A"]).items()}
    assert sorted(ref) == list(range(STEPS))
    got = _steps(runs["logs"][name])
    assert sorted(got) == list(range(STEPS)), name
    for step, entries in got.items():
        for e in entries:  # steps run twice (after the last checkpoint) must repeat exactly
            assert e["loss_bits"] == ref[step]["loss_bits"], (name, step)
            assert e["ids"] == ref[step]["ids"], (name, step)
    final, want = runs["final"][name], runs["final"]["A"]
    assert sorted(final) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(final[key], want[key], err_msg=f"{name} {key}")


def test_reference_run_sees_every_example_once_per_epoch(runs):
    ref = _steps(runs["logs"]["A"])
    ids = np.concatenate([ref[s][0]["ids"] for s in range(STEPS)])
    for epoch in ids.reshape(-1, NUM_EXAMPLES):
        assert sorted(epoch) == list(range(NUM_EXAMPLES))
    losses = [ref[s][0]["loss"] for s in range(STEPS)]
    assert np.all(np.isfinite(losses)) and len(set(losses)) == STEPS


def test_kill9_then_rerun_equals_the_uninterrupted_run(runs):
    assert runs["rc"]["B"] == -signal.SIGKILL and runs["rc2"]["B"] == 0
    starts = [e for e in runs["logs"]["B"] if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0
    resumed = starts[1]["step"]
    # the newest checkpoint committed when the process died (an in-flight async save is not)
    assert resumed == runs["committed_b"][-1] and resumed % SAVE_EVERY == 0, starts
    assert resumed <= max(_steps(runs["first"]["B"])) + 1
    assert "resumed from step" in starts[1]["how"] and "data iterator restored" in starts[1]["how"]
    _assert_matches_reference(runs, "B")
    # no example seen twice or skipped: the steps kept (first run up to the checkpoint, then the
    # rerun) read each example exactly once per epoch
    kept = {e["step"]: e["ids"] for e in runs["logs"]["B"] if e["event"] == "step"}
    ids = np.concatenate([kept[s] for s in range(STEPS)])
    for epoch in ids.reshape(-1, NUM_EXAMPLES):
        assert sorted(epoch) == list(range(NUM_EXAMPLES))


def test_sigterm_checkpoints_exits_cleanly_and_resume_continues(runs):
    assert runs["rc"]["C"] == 0  # a clean exit, not a signal death
    first = runs["first"]["C"]
    preempted = [e for e in first if e["event"] == "preempted"]
    assert len(preempted) == 1
    stop = preempted[0]["step"]
    assert stop > TERM_STEP and stop == max(e["step"] for e in first if e["event"] == "step") + 1
    assert stop in runs["committed_c"]  # the preemption step was committed, even if odd
    assert not any(e["event"] == "done" for e in first)
    starts = [e for e in runs["logs"]["C"] if e["event"] == "start"]
    assert starts[1]["step"] == stop and "data iterator restored" in starts[1]["how"]
    # nothing was recomputed: the rerun starts exactly at the preemption step
    assert sorted(e["step"] for e in runs["logs"]["C"] if e["event"] == "step") == list(
        range(STEPS)
    )
    _assert_matches_reference(runs, "C")


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(runs):
    assert runs["rc"]["D"] == 0 and runs["committed_d"][-1] == STEPS
    previous = runs["committed_d"][-2]
    (start,) = [e for e in runs["logs"]["D"] if e["event"] == "start"]
    assert start["step"] == previous and f"resumed from step {previous}" in start["how"]
    assert "data iterator restored" in start["how"]
    corrupt = runs["root"] / "D" / "checkpoints.corrupt"
    assert len(os.listdir(corrupt)) == 1 and os.listdir(corrupt)[0].startswith(f"{STEPS}-")
    # the steps after the fallback are recomputed exactly as in A, and so are the final params
    ref = {s: e[0] for s, e in _steps(runs["logs"]["A"]).items()}
    got = _steps(runs["logs"]["D"])
    assert sorted(got) == list(range(previous, STEPS))
    for step, (e,) in got.items():
        assert e["loss_bits"] == ref[step]["loss_bits"] and e["ids"] == ref[step]["ids"], step
    for key, want in runs["final"]["A"].items():
        np.testing.assert_array_equal(runs["final"]["D"][key], want, err_msg=key)

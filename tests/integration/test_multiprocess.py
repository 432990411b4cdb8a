"""Two processes x 4 fake CPU devices through jax.distributed (gloo) == one process x 8 devices.

Jobs (the real training loop through tests/helpers/sharded_run.py, on the same tiny ArrayRecord set, global
batch 8, mesh data=2 x fsdp=4):

* R: one process, 8 devices, STEPS steps (the reference);
* M: two processes on localhost (coordinator 127.0.0.1:<free port>), 4 devices each, the mesh built
  with `dcn_data=2` (a hybrid ICI/DCN mesh, processes as the DCN granules), saving a multi-process
  orbax checkpoint (state + one data-iterator state per process) every 2 steps. Once process 1 has
  logged step 2 it alone receives SIGTERM: JAX's preemption sync must stop both processes at one
  agreed step, which both checkpoint before exiting with status 0;
* S: two processes x 4 devices on the single-slice path (`dcn_data=1`, fsdp over all 8 devices),
  the mesh built over the devices in alternating process order (as a real slice spreads a host's
  devices), so each process reads four one-row blocks of every global batch;
* M1: one process, 8 devices, resumes M's preemption checkpoint (written by 2 processes: the data
  iterator is positioned from the step) and runs to STEPS.

Every process is started by the test and waited on with a timeout (a peer that never connects makes
the other abort after JAX's own timeout).
"""

import json
import os
import shutil
import signal
import socket
import time

import numpy as np
import pytest
from helpers.sharded_run import launch, write_tiny_latents

TIMEOUT = 300
LR_STEP_TOL = 0.05 * 1e-3  # fp32 reduction order only: far below one Adam step (lr = 1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root, name, tag, *, steps, devices, extra=()):
    err = root / f"{name}.{tag}.stderr"
    proc = launch(
        root, name, err, devices=devices, steps=steps, batch_size=8, save_every=2, extra=extra
    )
    return proc, str(err)


def _wait_all(procs):
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, err in procs:
        assert proc.returncode == 0, open(err).read()[-4000:]


def _log(path):
    return [json.loads(line) for line in open(path).read().splitlines() if line.endswith("}")]


def _log_if(path):
    return _log(path) if os.path.exists(path) else []


def _losses(path):
    return {e["step"]: e["loss"] for e in _log(path) if e["event"] == "step"}


STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    write_tiny_latents(str(root / "data"), 40, [13, 13, 14])
    coordinator = f"127.0.0.1:{_free_port()}"
    multi = [
        _start(
            root,
            "M",
            i,
            steps=STEPS,
            devices=4,
            extra=(
                "--mesh=1,4,1",
                "--dcn_data=2",
                f"--coordinator={coordinator}",
                "--num_processes=2",
                f"--process_id={i}",
                "--step_delay=0.2",
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    single = f"127.0.0.1:{_free_port()}"
    single_slice = [
        _start(
            root,
            "S",
            i,
            steps=STEPS,
            devices=4,
            extra=(
                "--mesh=1,8,1",
                "--interleave_processes",
                f"--coordinator={single}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    reference = _start(root, "R", 0, steps=STEPS, devices=8, extra=("--mesh=2,4,1",))
    deadline = time.time() + TIMEOUT
    while not any(e["event"] == "step" and e["step"] >= 2 for e in _log_if(root / "M.log.p1")):
        assert time.time() < deadline and multi[1][0].poll() is None, (
            "M never reached step 2:\n" + open(multi[1][1]).read()[-3000:]
        )
        time.sleep(0.05)
    multi[1][0].send_signal(signal.SIGTERM)
    _wait_all([*multi, *single_slice, reference])
    shutil.copytree(root / "M" / "checkpoints", root / "M1" / "checkpoints")
    _wait_all([_start(root, "M1", 0, steps=STEPS, devices=8, extra=("--mesh=2,4,1",))])
    return root


def _stop(root):
    """The preemption step of M (the same on both processes, checked below)."""
    return [e["step"] for e in _log(root / "M.log.p0") if e["event"] == "preempted"][0]


def test_two_processes_equal_one_process_with_8_devices(runs):
    multi, ref = _losses(runs / "M.log.p0"), _losses(runs / "R.log.p0")
    assert multi == _losses(runs / "M.log.p1")  # both processes see the global loss
    stop = _stop(runs)
    assert sorted(multi) == list(range(stop)) and sorted(ref) == list(range(STEPS))
    np.testing.assert_allclose(
        [multi[s] for s in range(stop)], [ref[s] for s in range(stop)], rtol=1e-5
    )
    # each process read its own half of every global batch: together the single-process ids
    ref_ids = {e["step"]: e["ids"] for e in _log(runs / "R.log.p0") if e["event"] == "step"}
    for p, half in ((0, slice(0, 4)), (1, slice(4, 8))):
        ids = {e["step"]: e["ids"] for e in _log(runs / f"M.log.p{p}") if e["event"] == "step"}
        assert all(ids[s] == ref_ids[s][half] for s in range(stop)), p


def test_single_slice_mesh_with_interleaved_processes_equals_one_process(runs):
    # S: fsdp over all 8 devices of 2 processes (dcn_data=1), the mesh's device order alternating
    # the processes, so process p holds rows p, p+2, p+4, p+6 of every batch: four blocks each
    single, ref = _losses(runs / "S.log.p0"), _losses(runs / "R.log.p0")
    assert single == _losses(runs / "S.log.p1")
    assert sorted(single) == list(range(STEPS))
    np.testing.assert_allclose(
        [single[s] for s in range(STEPS)], [ref[s] for s in range(STEPS)], rtol=1e-5
    )
    ref_ids = {e["step"]: e["ids"] for e in _log(runs / "R.log.p0") if e["event"] == "step"}
    for p in (0, 1):
        ids = {e["step"]: e["ids"] for e in _log(runs / f"S.log.p{p}") if e["event"] == "step"}
        assert all(ids[s] == ref_ids[s][p::2] for s in range(STEPS)), p
    final, want = np.load(runs / "S.npz"), np.load(runs / "R.npz")
    for key in want.files:
        np.testing.assert_allclose(final[key], want[key], rtol=1e-5, atol=LR_STEP_TOL, err_msg=key)


def test_sigterm_on_one_host_stops_every_host_at_one_checkpointed_step(runs):
    # JAX's preemption service turns the SIGTERM of process 1 into one agreed step on both processes;
    # both saved it and exited with status 0 (checked by _wait_all)
    stops = [
        [e["step"] for e in _log(runs / f"M.log.p{p}") if e["event"] == "preempted"] for p in (0, 1)
    ]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    stop = stops[0][0]
    assert 2 < stop < STEPS
    for p in (0, 1):
        log = _log(runs / f"M.log.p{p}")
        assert [e["step"] for e in log if e["event"] == "step"] == list(range(stop)), p
        assert not any(e["event"] == "done" for e in log), p
    step_dir = runs / "M" / "checkpoints" / str(stop)
    files = sorted(f for f in os.listdir(step_dir / "data") if f.startswith("process_"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]  # one data state per process
    for f in files:
        assert json.loads((step_dir / "data" / f).read_text()) == {"next_index": stop}


def test_single_process_resumes_the_two_process_checkpoint(runs):
    stop = _stop(runs)
    starts = [e for e in _log(runs / "M1.log.p0") if e["event"] == "start"]
    assert starts[0]["step"] == stop and "not in the checkpoint" in starts[0]["how"]
    ref, resumed = _losses(runs / "R.log.p0"), _losses(runs / "M1.log.p0")
    rest = list(range(stop, STEPS))
    assert sorted(resumed) == rest
    np.testing.assert_allclose([resumed[s] for s in rest], [ref[s] for s in rest], rtol=1e-5)
    ref_ids = {e["step"]: e["ids"] for e in _log(runs / "R.log.p0") if e["event"] == "step"}
    got_ids = {e["step"]: e["ids"] for e in _log(runs / "M1.log.p0") if e["event"] == "step"}
    assert got_ids == {s: ref_ids[s] for s in rest}
    final, want = np.load(runs / "M1.npz"), np.load(runs / "R.npz")
    assert sorted(final.files) == sorted(want.files)
    for key in want.files:
        np.testing.assert_allclose(final[key], want[key], rtol=1e-5, atol=LR_STEP_TOL, err_msg=key)

"""The workdir lock: a second live run is refused naming the holder; a dead run's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from gmflow_jax.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError

_HOLD = """
import sys, time
from gmflow_jax.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("LOCKED", flush=True)
    sys.stdin.readline()  # hold until the parent says so
print("RELEASED", flush=True)
"""

_TRY = """
import sys
from gmflow_jax.workdir_lock import WorkdirLock, WorkdirLockedError
try:
    with WorkdirLock(sys.argv[1]):
        print("GOT IT")
except WorkdirLockedError as err:
    print("REFUSED", err)
    sys.exit(3)
"""


def test_second_process_is_refused_naming_the_holder_then_gets_it_after_release(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, workdir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        second = subprocess.run(
            [sys.executable, "-c", _TRY, workdir], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 3, second.stdout + second.stderr
        assert f"pid {holder.pid}" in second.stdout and socket.gethostname() in second.stdout
        assert "since" in second.stdout
    finally:
        holder.communicate("go\n", timeout=60)
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))
    third = subprocess.run(
        [sys.executable, "-c", _TRY, workdir], capture_output=True, text=True, timeout=60
    )
    assert third.returncode == 0 and "GOT IT" in third.stdout


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # exited: its pid is gone
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_FILE).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "start_time": 0.0})
    )
    with WorkdirLock(str(workdir)):
        holder = json.loads((workdir / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
    assert not (workdir / LOCK_FILE).exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_FILE).write_text(
        json.dumps({"pid": 1, "host": "some-other-host", "start_time": 0.0})
    )
    with pytest.raises(WorkdirLockedError, match="some-other-host"):
        WorkdirLock(str(workdir)).acquire()
    assert (workdir / LOCK_FILE).exists()


def test_same_process_cannot_take_it_twice(tmp_path):
    with WorkdirLock(str(tmp_path)), pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        WorkdirLock(str(tmp_path)).acquire()

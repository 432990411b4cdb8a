"""One run per workdir: an exclusive lock file taken at start, released at exit.

`WorkdirLock(workdir)` creates `<workdir>/LOCK_FILE` with `O_CREAT | O_EXCL` (atomic on POSIX
file systems) holding the holder's pid, host and start time as JSON. A second run on the same workdir
gets `WorkdirLockedError` naming that holder. A lock left by a dead process (same host, pid no longer
running) is taken over with a warning; a lock held on another host is never taken over (its pid
cannot be checked from here): the message says to remove the file if that run is known to be dead.

Multi-process runs: only process 0 takes the lock (every process shares the workdir).

    with WorkdirLock(workdir):
        train_and_evaluate(...)
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

from absl import logging

LOCK_FILE = "RUN_LOCK.json"
"""Name of the lock file inside the workdir."""


UNREADABLE_GRACE_S = 2.0
"""An unreadable lock file younger than this is being written by a starter, not left by a crash."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    """'pid P on host H since T' of a lock's contents."""
    started = holder.get("start_time")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, (int, float))
        else "an unknown time"
    )
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} since {when}"


class WorkdirLock:
    """The exclusive lock of one workdir (a context manager; `acquire` / `release` otherwise)."""

    def __init__(self, workdir: str):
        """Prepare the lock of `workdir` (created if needed); nothing is taken yet."""
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._held = False
        self._record: dict = {}

    def acquire(self) -> None:
        """Take the lock; `WorkdirLockedError` naming the holder when a live run has it."""
        os.makedirs(self.workdir, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time()}
        for _ in range(3):  # a takeover races with other starters: retry the exclusive create
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None and self._age() < UNREADABLE_GRACE_S:
                    # Why wait: another starter created the file and is writing it.
                    time.sleep(UNREADABLE_GRACE_S)
                    holder = self._read_holder()
                if holder is not None and not self._is_stale(holder):
                    raise WorkdirLockedError(
                        f"workdir {self.workdir!r} is in use by another run ({_describe(holder)}; "
                        f"lock file {self.path}). Wait for it to finish, or use another workdir; "
                        "if that run is dead on another host, remove the lock file."
                    ) from None
                logging.warning(
                    "Taking over the lock of %s left by a dead run (%s).",
                    self.workdir,
                    _describe(holder) if holder else "unreadable lock file",
                )
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self._held, self._record = True, record
            return
        raise WorkdirLockedError(f"could not take the lock {self.path} (other runs are starting)")

    def _age(self) -> float:
        """Seconds since the lock file was last written (infinite when it is gone)."""
        try:
            return time.time() - os.path.getmtime(self.path)
        except OSError:
            return float("inf")

    def _read_holder(self) -> dict | None:
        """The lock's contents, or None when it is missing or not (yet) valid JSON."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        """A lock of this host whose pid is gone."""
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        return not _pid_alive(pid)

    def release(self) -> None:
        """Remove the lock file if this object holds it (and it still names this process)."""
        if not self._held:
            return
        self._held = False
        if self._read_holder() == self._record:
            try:
                os.remove(self.path)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise

    def __enter__(self) -> WorkdirLock:
        """Acquire."""
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        """Release."""
        self.release()

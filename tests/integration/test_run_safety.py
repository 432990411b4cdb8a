"""Run safety through the one loop and the entry point (`python -m gmflow_jax.main`): a changed
config is refused with a diff and nothing is moved, a second run on a locked workdir is refused
naming the holder, a bad value is refused in one line before any work, and a run that goes
non-finite between checkpoints never writes a non-finite checkpoint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.config_files import REPO, load_config

from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.run import train_and_evaluate
from gmflow_jax.run_config import RunConfigMismatchError
from gmflow_jax.tasks import make_task
from gmflow_jax.train import loop
from gmflow_jax.train.task import run_keys
from gmflow_jax.workdir_lock import WorkdirLock

CONFIG = os.path.join(REPO, "configs", "checkerboard.py")


def _tiny(**train):
    config = load_config("checkerboard", "tiny")
    config.eval.enabled = False
    for k, v in train.items():
        setattr(config.train, k, v)
    return config


def _main(workdir, *overrides, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "gmflow_jax.main", f"--config={CONFIG}:tiny"]
    cmd += [f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _tree(path):
    return sorted(
        (os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(path)
        for f in files
    )


def test_a_changed_model_field_is_refused_with_a_diff_and_nothing_moves(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_tiny(num_steps=2), workdir)
    before = _tree(os.path.join(workdir, "checkpoints"))
    changed = _tiny(num_steps=4)
    changed.model.hidden_dim = 48
    changed.train.optimizer.lr = 3e-3
    with pytest.raises(RunConfigMismatchError) as err:
        train_and_evaluate(changed, workdir)
    message = str(err.value)
    assert "model.hidden_dim: 32 -> 48" in message and "train.optimizer.lr" in message
    assert "\n" not in message
    assert _tree(os.path.join(workdir, "checkpoints")) == before
    # extending the run is allowed and resumes
    _, state, info = loop.train(
        _tiny(num_steps=4), workdir, make_task(_tiny(), run_keys(0)), run_keys(0)
    )
    assert info["start_step"] == 2 and int(state.step) == 4


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(str(workdir)):
        proc = _main(workdir, "--config.train.num_steps=2")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "in use by another run" in last and f"pid {os.getpid()}" in last
    assert "Traceback" not in proc.stderr
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("--config.train.num_steps=-10", "config.train.num_steps"),
        ("--config.train.optimizer.eps=-1.0", "config.train.optimizer.eps"),
        ("--config.sample.batch_size=0", "config.sample.batch_size"),
        ("--config.train.foo=1", "config.train.foo"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_before_any_work(tmp_path, override, field):
    workdir = tmp_path / "run"
    proc = _main(workdir, override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert field in proc.stderr.strip().splitlines()[-1]
    assert not (workdir / "checkpoints").exists()


class _NaNAt:
    """The checkerboard task with a NaN in batch `bad_step` (a corrupt example mid-run)."""

    def __init__(self, task, bad_step):
        self.task, self.bad_step = task, bad_step

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batches(self, start_step, layout):
        for step, batch in enumerate(self.task.batches(start_step, layout), start_step):
            if step == self.bad_step:
                batch = {"x0": batch["x0"].at[0, 0, 0, 0].set(jnp.nan)}
            yield batch


def test_a_run_that_goes_non_finite_between_saves_never_saves_a_non_finite_state(tmp_path):
    # log_every far beyond every_steps: the old loop checked only at logging steps and saved NaN
    # parameters in between.
    config = _tiny(num_steps=10, log_every=100)
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    workdir = str(tmp_path / "run")
    keys = run_keys(config.seed)
    task = _NaNAt(make_task(config, keys), bad_step=4)
    with pytest.raises(FloatingPointError, match="at training step 4"):
        loop.train(config, workdir, task, keys)
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [2, 4]  # step 6 (after the NaN update) was never written
    # the newest checkpoint restores, finite, and the run goes on from it
    _, state, info = loop.train(_tiny(num_steps=4), workdir, make_task(config, keys), keys)
    assert info["start_step"] == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))

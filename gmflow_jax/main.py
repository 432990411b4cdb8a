"""Command-line entry point: `python -m gmflow_jax.main --config=configs/X.py[:variant] --workdir=DIR`.

Config fields are overridden with `--config.group.field=value` (ml_collections config flags). Rerunning
the same command resumes from the newest checkpoint in DIR.

Exit status: 0 when the run finished or was preempted (SIGTERM: checkpointed; rerun to resume);
2 for a bad flag or config value (one line, before any work); 1 for a refused run (the workdir is
locked by another run, its checkpoints were written with another config, or none of them restores),
also one line without a traceback. Anything else is a bug or an environment failure and keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from gmflow_jax.checkpoint import CheckpointMismatchError, NoRestorableCheckpointError
from gmflow_jax.config_validation import ConfigError, parse_flags
from gmflow_jax.run import train_and_evaluate
from gmflow_jax.run_config import RunConfigMismatchError
from gmflow_jax.workdir_lock import WorkdirLockedError

REFUSALS = (
    WorkdirLockedError,
    RunConfigMismatchError,
    CheckpointMismatchError,
    NoRestorableCheckpointError,
)
"""Errors that refuse a run for a reason the user must act on: one line, exit status 1."""

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':variant'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    """Run `train_and_evaluate` with the parsed config and workdir."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 shows them
        logging.set_verbosity(logging.WARNING)

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as err:
        sys.stderr.write(f"FATAL config error: {err}\n")
        sys.exit(2)
    except REFUSALS as err:
        sys.stderr.write(f"FATAL run refused: {err}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

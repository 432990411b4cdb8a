"""Command-line entry point: `python -m gmflow_jax.main --config=configs/X.py[:variant] --workdir=DIR`.

Config fields are overridden with `--config.group.field=value` (ml_collections config flags). Rerunning
the same command resumes from the newest checkpoint in DIR.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from gmflow_jax.run import train_and_evaluate

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

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

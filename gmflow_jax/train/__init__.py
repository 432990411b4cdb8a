"""Training: optimizer and schedules, EMA, train state and step, and the main job (spec §4).

`train_and_evaluate(config, workdir)` lives in `gmflow_jax.train.loop`; it is imported lazily here so
that the light modules (optimizer, ema, state) load without the solvers and evaluation code.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """Lazy access to `train_and_evaluate`."""
    if name == "train_and_evaluate":
        from gmflow_jax.train.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module 'gmflow_jax.train' has no attribute {name!r}")

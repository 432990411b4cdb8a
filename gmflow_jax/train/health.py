"""Run health checks the training loop makes before it trusts a state: finiteness and skipped steps.

=============================  ====================================================================
name                           what it is
=============================  ====================================================================
`nonfinite_leaves`             per-array flags "holds a NaN/Inf", one fused jitted reduction
`check_finite_state`           raise `NonFiniteStateError` naming the step, the quantity and arrays
`SkipCounter`                  count skipped steps (non-finite gradients, docs/math.md §4.6); too
                               many in a row raise `TooManySkippedStepsError`
=============================  ====================================================================

Why before each save: a checkpoint of non-finite parameters would rotate the good ones out
(`max_to_keep`); the loop calls `check_finite_state` right before `Checkpointer.save`, so the last
good checkpoint stays on disk and the run stops naming what went wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

DEFAULT_MAX_CONSECUTIVE_SKIPS = 100
"""Skipped steps in a row after which training stops (config `train.max_consecutive_skips`)."""


class NonFiniteStateError(FloatingPointError):
    """The train state holds NaN or Inf values."""


class TooManySkippedStepsError(FloatingPointError):
    """Too many consecutive steps were skipped for non-finite gradients."""


@jax.jit
def _nonfinite_flags(leaves: list[jax.Array]) -> jax.Array:
    """[num_leaves] bool: leaf i holds a non-finite value (one compiled program for all leaves)."""
    if not leaves:
        return jnp.zeros((0,), jnp.bool_)
    return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(trees: Mapping[str, PyTree]) -> list[str]:
    """Paths "<name><path>" of the floating arrays of `trees` that hold a NaN or Inf (one sync)."""
    named = []
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
                named.append((f"{name}{jax.tree_util.keystr(path)}", leaf))
    if not named:
        return []
    flags = np.asarray(jax.device_get(_nonfinite_flags([leaf for _, leaf in named])))
    return [path for (path, _), bad in zip(named, flags, strict=True) if bad]


def check_finite_state(state: Any, step: int, limit: int = 5) -> None:
    """Raise `NonFiniteStateError` if `state.params` or `state.ema_params` hold NaN/Inf.

    The message names the step, the quantity (params / ema_params) and up to `limit` arrays.
    """
    bad = nonfinite_leaves({"params": state.params, "ema_params": state.ema_params})
    if bad:
        quantities = sorted({path.split("[", 1)[0].split(".", 1)[0] for path in bad})
        shown = ", ".join(bad[:limit]) + (
            f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        )
        raise NonFiniteStateError(
            f"non-finite {' and '.join(quantities)} at step {int(step)}: {shown}. Not saved; the "
            "last checkpoint on disk is the last good state. Lower train.optimizer.lr, or enable "
            "train.optimizer.skip_nonfinite / grad_clip_norm."
        )


class SkipCounter:
    """Skipped-step bookkeeping over the loop's metric history (the step's `skipped` metric)."""

    def __init__(self, max_consecutive: int = DEFAULT_MAX_CONSECUTIVE_SKIPS, consecutive: int = 0):
        """`max_consecutive` skips in a row are allowed; one more raises."""
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = consecutive

    def update(self, history: Iterable[tuple[int, Mapping[str, float]]]) -> int:
        """Count the skips of `history` ((0-based step, host metrics), in order); returns the
        number in this history. Raises `TooManySkippedStepsError` naming the steps."""
        count = 0
        for step, metrics in history:
            if metrics.get("skipped", 0.0) > 0:
                count += 1
                self.consecutive += 1
                if self.consecutive > self.max_consecutive:
                    first = step - self.consecutive + 1
                    raise TooManySkippedStepsError(
                        f"{self.consecutive} consecutive training steps ({first}..{step}, 0-based) "
                        "were skipped for non-finite gradients (limit "
                        f"train.max_consecutive_skips = {self.max_consecutive}); the run diverged: "
                        "lower train.optimizer.lr or check the data."
                    )
            else:
                self.consecutive = 0
        self.total += count
        return count

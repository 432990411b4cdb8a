"""Health checks: non-finite params / EMA are named with the step; skipped-step counting and limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from gmflow_jax.train.health import (
    NonFiniteStateError,
    SkipCounter,
    TooManySkippedStepsError,
    check_finite_state,
    nonfinite_leaves,
)


@struct.dataclass
class _State:
    params: dict
    ema_params: dict
    step: jax.Array


def _state():
    params = {"a": jnp.ones((4, 3)), "b": {"c": jnp.zeros((5,), jnp.bfloat16)}, "n": jnp.int32(3)}
    return _State(
        params=params, ema_params=jax.tree.map(lambda x: x * 2, params), step=jnp.int32(0)
    )


def test_finite_state_passes():
    check_finite_state(_state(), 10)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["params", "ema_params"])
def test_each_nonfinite_array_is_named_with_step_and_quantity(value, where):
    state = _state()
    tree = getattr(state, where)
    bad = dict(tree, b={"c": tree["b"]["c"].at[2].set(value)})
    state = state.replace(**{where: bad})
    # Oracle: numpy's isfinite over every leaf.
    expected = [
        f"{name}{jax.tree_util.keystr(p)}"
        for name, t in (("params", state.params), ("ema_params", state.ema_params))
        for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
        if not np.all(np.isfinite(np.asarray(x, np.float64)))
    ]
    assert nonfinite_leaves({"params": state.params, "ema_params": state.ema_params}) == expected
    with pytest.raises(
        NonFiniteStateError, match=rf"non-finite {where} at step 25: .*\['b'\]\['c'\]"
    ):
        check_finite_state(state, 25)


def test_skip_counter_counts_and_stops_after_the_limit():
    counter = SkipCounter(max_consecutive=3)
    history = [(i, {"skipped": float(i in (1, 2, 4, 5, 6))}) for i in range(8)]
    assert counter.update(history) == 5
    assert counter.total == 5 and counter.consecutive == 0
    with pytest.raises(TooManySkippedStepsError, match=r"4 consecutive training steps \(10\.\.13"):
        counter.update([(i, {"skipped": 1.0}) for i in range(10, 15)])


def test_skip_runs_across_histories_are_joined():
    counter = SkipCounter(max_consecutive=2)
    counter.update([(0, {"skipped": 0.0}), (1, {"skipped": 1.0})])
    counter.update([(2, {"skipped": 1.0})])
    with pytest.raises(TooManySkippedStepsError, match=r"\(1\.\.3"):
        counter.update([(3, {"skipped": 1.0})])

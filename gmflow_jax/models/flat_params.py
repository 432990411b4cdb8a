"""Flat parameter dicts: a network's parameters keyed by dotted path, and the GM-DiT block layouts.

Converted checkpoints (`gmflow_jax.interop`) store parameters as flat float32 arrays keyed by their
dotted path in the NNX state (`blocks.0.attn_q.kernel`); this module turns a state into that dict
and back into a module, and converts the GM-DiT between its two block layouts (§6.1): the list
layout `blocks.{i}.X` (one entry per block) and the scan layout `blocks.X` (stacked with a leading
`[num_layers]` axis, `GMDiTConfig.scan_blocks=True`).

==========================  ===================================================================
name                        what it is
==========================  ===================================================================
`flat_params`               leaves of a state keyed by dotted path
`abstract_flat_params`      the same for a module described by a builder (nothing allocated)
`module_from_flat_params`   the module a builder describes, holding given flat float32 params
`stack_blocks`              list layout -> scan layout
`unstack_blocks`            scan layout -> list layout
==========================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_params(state: nnx.State) -> dict[str, Any]:
    """Leaves of `state` keyed by dotted path (`blocks.0.attn_q.kernel`)."""
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    return {".".join(str(p) for p in path): v for path, v in flat.items()}


def abstract_flat_params(build: Callable[[], nnx.Module]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the parameters of the module `build()` returns, by dotted path (no allocation)."""
    return flat_params(nnx.split(nnx.eval_shape(build))[1])


def module_from_flat_params(
    build: Callable[[], nnx.Module], params: Mapping[str, Any], what: str
) -> Any:
    """The module `build()` describes, holding `params` (flat dotted keys) as float32 arrays.

    Raises ValueError naming every missing key, unexpected key and shape mismatch (`what` names the
    network in the message) before anything is allocated.
    """
    graphdef, state = nnx.split(nnx.eval_shape(build))
    expected = flat_params(state)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    bad = [
        f"{k} {tuple(np.shape(params[k]))}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in params and tuple(np.shape(params[k])) != tuple(v.shape)
    ]
    if missing or extra or bad:
        raise ValueError(
            f"{what} params do not match the config: missing {missing}, unexpected {extra}, "
            f"shape mismatches {bad}"
        )
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    new = {p: jnp.asarray(params[".".join(str(q) for q in p)], jnp.float32) for p in flat}
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(new))
    return nnx.merge(graphdef, state)


def stack_blocks(params: Mapping[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """List layout `blocks.{i}.X` -> scan layout `blocks.X` stacked over i = 0..num_layers-1."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks.")}
    names = sorted({k.split(".", 2)[2] for k in params if k.startswith("blocks.0.")})
    for name in names:
        missing = [i for i in range(num_layers) if f"blocks.{i}.{name}" not in params]
        if missing:
            raise ValueError(f"params lack blocks.{{i}}.{name} for block indices {missing}")
        out[f"blocks.{name}"] = np.stack(
            [np.asarray(params[f"blocks.{i}.{name}"]) for i in range(num_layers)]
        )
    leftover = {k for k in params if k.startswith("blocks.")} - {
        f"blocks.{i}.{n}" for i in range(num_layers) for n in names
    }
    if leftover:
        raise ValueError(
            f"params have block entries outside 0..{num_layers - 1}: {sorted(leftover)}"
        )
    return out


def unstack_blocks(params: Mapping[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Scan layout `blocks.X` `[num_layers, ...]` -> list layout `blocks.{i}.X`."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks.")}
    for key, value in params.items():
        if not key.startswith("blocks."):
            continue
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != num_layers:
            raise ValueError(
                f"{key} has shape {value.shape}; the scan layout needs a leading axis {num_layers}"
            )
        name = key[len("blocks.") :]
        for i in range(num_layers):
            out[f"blocks.{i}.{name}"] = value[i]
    return out

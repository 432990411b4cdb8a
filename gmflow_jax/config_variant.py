"""The variant string of a config file (`--config=configs/X.py:tiny_baseline`), parsed one way.

A variant is tokens joined by "_" or ",": at most one size name, plus on/off switches. Every
config in `configs/` calls `parse_variant` (as big_vision's configs call `parse_arg`);
`load_config_file` runs a config file's `get_config(variant)` as `--config=path:variant` does.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any


def parse_variant(
    config_name: str,
    variant: str | None,
    sizes: Sequence[str],
    default_size: str,
    switches: Sequence[str] = (),
) -> tuple[str, frozenset[str]]:
    """(size, switches present) of `variant`; ValueError naming the token and what is allowed."""
    tokens = [t for t in (variant or "").replace(",", "_").split("_") if t]
    size, present, named_sizes = default_size, set(), []
    for token in tokens:
        if token in switches:
            present.add(token)
        elif token in sizes:
            size = token
            named_sizes.append(token)
        else:
            allowed = ", ".join([*sizes, *switches])
            raise ValueError(
                f"unknown {config_name} config variant token {token!r} in {variant!r}; "
                f"allowed: {allowed}"
            )
    if len(named_sizes) > 1:
        raise ValueError(
            f"{config_name} config variant {variant!r} names {len(named_sizes)} sizes "
            f"({', '.join(named_sizes)}); name at most one of: {', '.join(sizes)}"
        )
    return size, frozenset(present)


def load_config_file(path: str | os.PathLike, variant: str = "") -> Any:
    """`get_config(variant)` of the config file `path` (`get_config()` when `variant` is empty), as
    `--config=path:variant` loads it; the file runs as a fresh module each call."""
    name = "_gmflow_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()

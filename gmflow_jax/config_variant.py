"""The variant string of a config file (`--config=configs/X.py:tiny_baseline`), parsed one way.

A variant is tokens joined by "_" or ",": at most one size name, plus on/off switches. Every
config in `configs/` calls `parse_variant` (as big_vision's configs call `parse_arg`).
"""

from __future__ import annotations

from collections.abc import Sequence


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

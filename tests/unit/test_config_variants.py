"""Config-file variant strings: every size/switch combination loads, and bad ones name the token."""

from __future__ import annotations

import itertools

import pytest
from helpers.config_files import load_config

from gmflow_jax.config_variant import parse_variant

CONFIGS = {
    # name: (sizes, default size, switches)
    "checkerboard": (("small", "full", "tiny"), "small", ("baseline",)),
    "digits": (("small", "tiny"), "small", ("baseline",)),
    "imagenet256": (("full", "tiny"), "full", ()),
}


def test_parse_variant_tokens_order_and_separators():
    sizes, switches = ("small", "tiny"), ("baseline", "bf16")
    assert parse_variant("x", "", sizes, "small", switches) == ("small", frozenset())
    assert parse_variant("x", None, sizes, "small", switches) == ("small", frozenset())
    for text in ("tiny_baseline", "baseline_tiny", "tiny,baseline", "_tiny__baseline_"):
        assert parse_variant("x", text, sizes, "small", switches) == ("tiny", {"baseline"})
    assert parse_variant("x", "bf16_baseline", sizes, "small", switches)[1] == {"baseline", "bf16"}


def test_parse_variant_rejects_unknown_tokens_and_two_sizes():
    with pytest.raises(
        ValueError, match=r"unknown x config variant token 'huge'.*allowed: small, tiny"
    ):
        parse_variant("x", "huge", ("small", "tiny"), "small")
    with pytest.raises(ValueError, match=r"names 2 sizes \(small, tiny\)"):
        parse_variant("x", "small_tiny", ("small", "tiny"), "small")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_variant_loads_and_bad_tokens_are_rejected(name):
    sizes, default, switches = CONFIGS[name]
    combos = [""] + ["_".join(filter(None, c)) for c in itertools.product(sizes, ("", *switches))]
    seen = {variant: load_config(name, variant).to_json_best_effort() for variant in combos}
    # The empty variant is the default size; a switch changes the config.
    assert seen[""] == seen[default]
    for switch in switches:
        assert seen[f"{default}_{switch}"] != seen[default]
    with pytest.raises(ValueError, match=f"unknown {name} config variant token 'nope'"):
        load_config(name, "nope")

"""The official checkpoint's configs -> ours: `transformer/config.json` and `spectrum_net/config.json`.

Reference: `docs/official-checkpoint.md` (the configs), `docs/math.md` §8.1-8.2. The official
transformer config is the reference `_GMDiTTransformer2DModel.__init__` arguments; keys it omits
take the reference defaults (`OFFICIAL_DIT_DEFAULTS`). Options our GM-DiT does not implement are
refused with a ValueError naming the option. Integer fields must hold integers: a JSON integer, or a
float with an integral value (`28.0`); anything else (`2.7`, `"28"`, `true`, null) is refused naming
the field and the value, never truncated. `norm_eps` must be a number.

================================  ================================================================
name                              what it is
================================  ================================================================
`gm_dit_config_from_official`     `GMDiTConfig` of an official transformer config
`spectrum_config_from_official`   `{"base_size": [C, H0, W0], "layers": [n1, n2]}` of an official
                                  spectrum_net config
`official_int`                    one integer field, checked (no truncation)
================================  ================================================================
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from gmflow_jax.models.gm_dit import MLP_NORM_EPS, GMDiTConfig

OFFICIAL_DIT_DEFAULTS: dict[str, Any] = {
    "num_gaussians": 16,
    "constant_logstd": None,
    "logstd_inner_dim": 1024,
    "gm_num_logstd_layers": 2,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}
"""Defaults of the reference `_GMDiTTransformer2DModel.__init__` (for keys a config omits)."""


def official_int(section: str, key: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`: an integer, or a float with an integral value; else a
    ValueError naming `section`, `key` and the value (no truncation: 2.7 is refused)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and not isinstance(value, numbers.Integral):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok or value < minimum:
        raise ValueError(f"{section} config {key}={value!r} must be an integer >= {minimum}")
    return int(value)


def _int_list(section: str, key: str, value: Any, length: int) -> list[int]:
    """A list of `length` integers >= 1 (`official_int` each), else a ValueError naming `key`."""
    if not isinstance(value, list | tuple) or len(value) != length:
        raise ValueError(
            f"{section} config {key}={value!r} must be a list of {length} integers >= 1"
        )
    return [official_int(section, f"{key}[{i}]", v) for i, v in enumerate(value)]


def gm_dit_config_from_official(config: Mapping[str, Any], **overrides: Any) -> GMDiTConfig:
    """`GMDiTConfig` of an official `transformer/config.json` dict (plus field overrides).

    Raises ValueError for the options our GM-DiT does not implement (V2 heads, a constant log-std,
    a log-std head depth other than 2, other norms / activations / eps, out_channels != in_channels).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config)}")
    cls_name = str(config.get("_class_name", "GMDiTTransformer2DModel"))
    if "GMDiTTransformer2DModel" not in cls_name or cls_name.endswith("V2"):
        raise ValueError(
            f"transformer config _class_name must be the GM-DiT V1 class "
            f"('GMDiTTransformer2DModel' or '_GMDiTTransformer2DModel'), got {cls_name!r}"
        )
    c = {**OFFICIAL_DIT_DEFAULTS, **config}
    required = {
        "constant_logstd": None,
        "gm_num_logstd_layers": 2,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
    }
    for key, want in required.items():
        if c[key] != want:
            raise ValueError(
                f"transformer config {key}={c[key]!r} is not supported; GM-DiT needs {want!r}"
            )
    eps = c["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"transformer config norm_eps={eps!r} must be a number ({MLP_NORM_EPS})")
    if not math.isclose(float(eps), MLP_NORM_EPS):
        raise ValueError(
            f"transformer config norm_eps={c['norm_eps']!r} is not supported; GM-DiT needs "
            f"{MLP_NORM_EPS}"
        )
    if c["out_channels"] not in (None, c["in_channels"]):
        raise ValueError(
            f"transformer config out_channels={c['out_channels']!r} must be null or equal "
            f"in_channels={c['in_channels']!r}"
        )
    n = {
        key: official_int("transformer", key, c[key])
        for key in (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "patch_size",
            "in_channels",
            "sample_size",
            "num_gaussians",
            "num_embeds_ada_norm",
            "logstd_inner_dim",
        )
    }
    fields = dict(
        num_layers=n["num_layers"],
        hidden_size=n["num_attention_heads"] * n["attention_head_dim"],
        num_heads=n["num_attention_heads"],
        patch_size=n["patch_size"],
        in_channels=n["in_channels"],
        sample_size=n["sample_size"],
        num_gaussians=n["num_gaussians"],
        num_classes=n["num_embeds_ada_norm"],
        logstd_inner_dim=n["logstd_inner_dim"],
    )
    fields.update(overrides)
    return GMDiTConfig(**fields)


def spectrum_config_from_official(config: Mapping[str, Any]) -> dict[str, list[int]]:
    """`{"base_size": [C, H0, W0], "layers": [n1, n2]}` of an official `spectrum_net/config.json`."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config)}")
    base_size = _int_list("spectrum_net", "base_size", config.get("base_size", [4, 32, 32]), 3)
    layers = config.get("layers", [64, 8])
    if isinstance(layers, list | tuple) and len(layers) != 2:
        raise ValueError(
            f"spectrum_net config layers={layers!r} is not supported; SpectrumMLP has exactly two "
            "hidden layers (e.g. [64, 8])"
        )
    layers = _int_list("spectrum_net", "layers", layers, 2)
    return {"base_size": base_size, "layers": layers}

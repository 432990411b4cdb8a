"""The one model builder: `config.model` -> the network, on every path (training, checkpoints, official).

`config.model` is an `ml_collections.ConfigDict` or a plain mapping with a `name`:

===========  ==================================================================================
name         network
===========  ==================================================================================
"toy_mlp"    `models.toy_mlp.ToyMLP` (§6.4); every other key that names a `ToyMLP` argument
             (`num_gaussians`, `embed_dim`, `hidden_dim`, `num_layers`, ...) is passed to it
"gm_dit"     `models.image_denoiser.ImageDenoiser`: a GM-DiT (§6.1; the keys that name
             `GMDiTConfig` fields) and, when `spectrum_net.enabled`, a float32 SpectrumMLP (§6.3;
             `spectrum_net.base_size` (C, H0, W0), `spectrum_net.layers` (n1, n2))
===========  ==================================================================================

A run's pipeline config (`config.json` in its workdir, read by
`gmflow_jax.pipeline.GMFlowPipeline.from_checkpoint`) is `pipeline_config(config.model)`:
`{"model": <GMDiTConfig fields, dtype by name>, "spectrum_net": {"base_size", "layers"}}` (the
latter only with a SpectrumMLP); `model_config_from_pipeline_config` turns it back into the
`config.model` form, so a checkpoint is restored onto the same `build_model` network it was
trained as.

================================  ================================================================
name                              what it is
================================  ================================================================
`build_model`, `abstract_model`   the network of `config.model` (params from a key / shapes only)
`build_image_denoiser`            GM-DiT + optional float32 SpectrumMLP from their configs
`gm_dit_config_from`              `GMDiTConfig` from `config.model` (name "gm_dit")
`spectrum_config_from`            `SpectrumConfig` from `config.model.spectrum_net`, or None
`gm_dit_config_to_dict`,          `GMDiTConfig` <-> JSON-safe dict
`gm_dit_config_from_dict`
`pipeline_config`,                `config.model` <-> the run's pipeline config (config.json)
`model_config_from_pipeline_config`
`gm_dit_from_params`,             networks holding flat float32 parameters (dotted keys, as
`spectrum_from_params`            converted checkpoints store them; `models.flat_params`)
================================  ================================================================
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax.models.flat_params import module_from_flat_params
from gmflow_jax.models.gm_dit import GMDiT, GMDiTConfig
from gmflow_jax.models.image_denoiser import ImageDenoiser, SpectrumConfig, check_spectrum_fits
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.toy_mlp import ToyMLP

Array = jax.Array
ModelConfig = Mapping[str, Any]  # or an ml_collections.ConfigDict (the same item access)

MODEL_NAMES = ("toy_mlp", "gm_dit")
"""Values of `config.model.name`."""

_GM_DIT_FIELDS = tuple(f.name for f in dataclasses.fields(GMDiTConfig))

_TOY_MLP_ARGS = tuple(
    name for name in inspect.signature(ToyMLP.__init__).parameters if name not in ("self", "rngs")
)
"""The `ToyMLP` arguments a `config.model` key may set (its signature: one place to extend)."""


def _name(model_cfg: ModelConfig) -> str:
    """`config.model.name`, checked against `MODEL_NAMES`."""
    name = model_cfg.get("name") if hasattr(model_cfg, "get") else None
    if name not in MODEL_NAMES:
        raise ValueError(f"config.model.name must be one of {MODEL_NAMES}, got {name!r}")
    return name


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def gm_dit_config_from(model_cfg: ModelConfig, **overrides: Any) -> GMDiTConfig:
    """`GMDiTConfig` from the GM-DiT fields of `config.model` (name "gm_dit"), plus overrides."""
    if _name(model_cfg) != "gm_dit":
        raise ValueError(
            f"config.model.name must be 'gm_dit' for a GM-DiT, got {model_cfg['name']!r}"
        )
    fields = {k: model_cfg[k] for k in _GM_DIT_FIELDS if k in model_cfg}
    return GMDiTConfig(**{**fields, **overrides})


def spectrum_config_from(model_cfg: ModelConfig) -> SpectrumConfig | None:
    """`SpectrumConfig` of `config.model.spectrum_net` when enabled, else None."""
    spec = model_cfg.get("spectrum_net")
    if spec is None or not spec.get("enabled", False):
        return None
    return SpectrumConfig(
        base_size=tuple(int(s) for s in spec["base_size"]),
        layers=tuple(int(n) for n in spec["layers"]),
    )


def gm_dit_config_to_dict(config: GMDiTConfig) -> dict[str, Any]:
    """The `GMDiTConfig` fields as a JSON-safe dict (dtype as its name)."""
    out = dataclasses.asdict(config)
    out["dtype"] = jnp.dtype(config.dtype).name
    return out


def gm_dit_config_from_dict(fields: Mapping[str, Any], **overrides: Any) -> GMDiTConfig:
    """`GMDiTConfig` from `gm_dit_config_to_dict` output (plus overrides); unknown keys raise."""
    known = {f.name for f in dataclasses.fields(GMDiTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"GM-DiT config has unknown fields {unknown}; allowed: {sorted(known)}")
    return GMDiTConfig(**{**fields, **overrides})


def pipeline_config(model_cfg: ModelConfig) -> dict[str, Any]:
    """The run's pipeline config (module docstring) of a "gm_dit" `config.model`."""
    out: dict[str, Any] = {"model": gm_dit_config_to_dict(gm_dit_config_from(model_cfg))}
    spec = spectrum_config_from(model_cfg)
    if spec is not None:
        out["spectrum_net"] = {"base_size": list(spec.base_size), "layers": list(spec.layers)}
    return out


def model_config_from_pipeline_config(
    run_config: Mapping[str, Any], **overrides: Any
) -> dict[str, Any]:
    """The "gm_dit" `config.model` (a plain dict) of a run's pipeline config, GM-DiT fields overridden.

    Raises ValueError for a config without a `model` mapping or with unknown GM-DiT fields.
    """
    if not isinstance(run_config, Mapping) or not isinstance(run_config.get("model"), Mapping):
        keys = sorted(run_config) if isinstance(run_config, Mapping) else []
        raise ValueError(
            "the pipeline config must be a mapping with a 'model' entry (GMDiTConfig fields), got "
            f"{type(run_config).__name__} with keys {keys}"
        )
    config = gm_dit_config_from_dict(run_config["model"], **overrides)
    spec = run_config.get("spectrum_net")
    out: dict[str, Any] = {"name": "gm_dit", **gm_dit_config_to_dict(config)}
    out["spectrum_net"] = {"enabled": False}
    if spec:
        out["spectrum_net"] = {
            "enabled": True,
            "base_size": list(spec["base_size"]),
            "layers": list(spec["layers"]),
        }
    return out


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


def build_image_denoiser(
    config: GMDiTConfig, spectrum: SpectrumConfig | None, key: Array
) -> ImageDenoiser:
    """GM-DiT of `config` and, if `spectrum` is given, a float32 SpectrumMLP, params from `key`.

    The GM-DiT draws its initial parameters first, then the SpectrumMLP, from one `nnx.Rngs`.
    """
    if spectrum is not None:
        check_spectrum_fits(config, spectrum.base_size)  # before any allocation
    rngs = nnx.Rngs(params=key)
    denoiser = GMDiT(config, rngs=rngs)
    spectrum_net = (
        SpectrumMLP(spectrum.base_size, spectrum.layers, dtype=jnp.float32, rngs=rngs)
        if spectrum is not None
        else None
    )
    return ImageDenoiser(denoiser, spectrum_net)


def build_model(model_cfg: ModelConfig, key: Array) -> nnx.Module:
    """The network named by `config.model` (module docstring), parameters initialized from `key`."""
    if _name(model_cfg) == "toy_mlp":
        fields = {k: model_cfg[k] for k in _TOY_MLP_ARGS if k in model_cfg}
        return ToyMLP(**fields, rngs=nnx.Rngs(params=key))
    return build_image_denoiser(gm_dit_config_from(model_cfg), spectrum_config_from(model_cfg), key)


def abstract_model(model_cfg: ModelConfig) -> nnx.Module:
    """`build_model(model_cfg, ...)` with `jax.ShapeDtypeStruct` leaves (`nnx.eval_shape`)."""
    _name(model_cfg)  # a bad name fails here, not inside the trace
    return nnx.eval_shape(lambda: build_model(model_cfg, jax.random.PRNGKey(0)))


def gm_dit_from_params(config: GMDiTConfig, params: Mapping[str, Any]) -> GMDiT:
    """A `GMDiT` holding `params` (flat dotted keys in the layout of `config.scan_blocks`)."""
    return module_from_flat_params(lambda: GMDiT(config, rngs=nnx.Rngs(0)), params, "GM-DiT")


def spectrum_from_params(
    base_size: Sequence[int], layers: Sequence[int], params: Mapping[str, Any]
) -> SpectrumMLP:
    """A float32 `SpectrumMLP` holding `params` (flat dotted keys: `linear_1.kernel`, ...)."""
    return module_from_flat_params(
        lambda: SpectrumMLP(base_size, layers, dtype=jnp.float32, rngs=nnx.Rngs(0)),
        params,
        "SpectrumMLP",
    )

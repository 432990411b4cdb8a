"""Reading the official diffusers folder (`Lakonik/gmflow_imagenet_k8_ema`) and converting it in memory.

The official folder (a diffusers pipeline) holds `transformer/` and `spectrum_net/`, each a
`config.json` and a safetensors file: `diffusion_pytorch_model.safetensors` (fp32) or a variant
`diffusion_pytorch_model.<variant>.safetensors` (`bf16`, `fp16`), or a sharded file with its
`.safetensors.index.json`; and `vae/` in the same form. Arrays are read with `safetensors.numpy`
(no torch) and converted to float32 by the key table (`gmflow_jax.interop.key_table`).

==========================  =====================================================================
name                        what it is
==========================  =====================================================================
`find_weights_file`         the weights file of a component folder (requested variant first)
`read_safetensors`          every array of a safetensors file (or of the shards of an index)
`read_json`                 a JSON file as a dict
`read_component`            (config, state dict, weights path) of `root/<component>`
`is_official_folder`        whether a path is a raw diffusers GM-DiT folder
`OfficialModels`            the GM-DiT, SpectrumMLP and VAE of an official pipeline
`read_vae_folder`           a diffusers `vae/` folder converted in memory
`read_official_folder`      a raw official folder converted in memory
==========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from gmflow_jax.interop.key_table import (
    convert_spectrum_state_dict,
    convert_transformer_state_dict,
)
from gmflow_jax.interop.official_config import (
    gm_dit_config_from_official,
    spectrum_config_from_official,
)
from gmflow_jax.models.builder import gm_dit_from_params, spectrum_from_params
from gmflow_jax.models.gm_dit import GMDiT
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    convert_diffusers_state_dict,
    vae_from_params,
)

WEIGHTS_NAME = "diffusion_pytorch_model"
"""Stem of the diffusers weights file (`<stem>[.<variant>].safetensors`)."""

VARIANTS = (None, "bf16", "fp16")
"""Weights-file variants tried, after the requested one, in this order (None = the plain file)."""


def find_weights_file(folder: str, variant: str | None = None) -> str:
    """Path of the diffusers weights in `folder`: the `variant` file first, then `VARIANTS` order.

    A sharded checkpoint is named by its `.safetensors.index.json`. Raises FileNotFoundError naming
    the files looked for.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    order = [variant] + [v for v in VARIANTS if v != variant]
    tried = []
    for v in order:
        stem = WEIGHTS_NAME if v is None else f"{WEIGHTS_NAME}.{v}"
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            tried.append(name)
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{folder!r} holds none of the weights files {tried}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All arrays of a safetensors file, or of every shard listed by a `.safetensors.index.json`."""
    if not path.endswith(".index.json"):
        return load_file(path)
    with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_file(os.path.join(os.path.dirname(path), shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{path!r} lists keys absent from its shards: {missing[:10]}")
    return out


def read_json(path: str) -> dict[str, Any]:
    """A JSON file as a dict (FileNotFoundError naming the path when absent)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path) as f:
        return json.load(f)


def read_component(
    root: str, component: str, variant: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """(config dict, state dict, weights path) of `root/component` of an official folder."""
    folder = os.path.join(root, component)
    config = read_json(os.path.join(folder, "config.json"))
    weights = find_weights_file(folder, variant)
    return config, read_safetensors(weights), weights


def is_official_folder(path: str) -> bool:
    """Whether `path` looks like a raw diffusers GM-DiT folder (`transformer/config.json`)."""
    return os.path.isfile(os.path.join(path, "transformer", "config.json"))


@dataclasses.dataclass
class OfficialModels:
    """The networks of an official GM-DiT pipeline, as Flax modules (SpectrumMLP in float32)."""

    transformer: GMDiT
    spectrum_net: SpectrumMLP | None
    vae: AutoencoderKL | None


def read_vae_folder(folder: str, variant: str | None, dtype: Any) -> AutoencoderKL:
    """A diffusers `vae/` folder converted in memory (compute dtype `dtype`)."""
    config = VAEConfig.from_diffusers(read_json(os.path.join(folder, "config.json")), dtype=dtype)
    state_dict = read_safetensors(find_weights_file(folder, variant))
    return vae_from_params(config, convert_diffusers_state_dict(state_dict, config))


def read_official_folder(
    root: str, variant: str | None, scan_blocks: bool, dtype: Any, with_vae: bool
) -> OfficialModels:
    """A raw official folder converted in memory (`dtype`: compute dtype of GM-DiT and VAE)."""
    config_dict, sd, _ = read_component(root, "transformer", variant)
    config = gm_dit_config_from_official(config_dict, scan_blocks=scan_blocks, dtype=dtype)
    transformer = gm_dit_from_params(config, convert_transformer_state_dict(sd, config))
    del sd
    spectrum = None
    if os.path.isdir(os.path.join(root, "spectrum_net")):
        spec_dict, spec_sd, _ = read_component(root, "spectrum_net", variant)
        spec_cfg = spectrum_config_from_official(spec_dict)
        params = convert_spectrum_state_dict(spec_sd, spec_cfg["base_size"], spec_cfg["layers"])
        spectrum = spectrum_from_params(spec_cfg["base_size"], spec_cfg["layers"], params)
    vae = None
    if with_vae and os.path.isdir(os.path.join(root, "vae")):
        vae = read_vae_folder(os.path.join(root, "vae"), variant, dtype)
    return OfficialModels(transformer, spectrum, vae)

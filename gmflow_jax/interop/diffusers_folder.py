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
`read_component`            (config, state dict, weights path) of `root/<component>`
`convert_transformer_component`, `convert_spectrum_component`
                            a component's config and our float32 params (errors name the file)
`vae_config_of`, `convert_vae_weights`
                            the same for a diffusers VAE (config file, weights file)
`is_official_folder`        whether a path is a raw diffusers GM-DiT folder
`OfficialModels`            the GM-DiT, SpectrumMLP and VAE of an official pipeline
`read_vae_folder`           a diffusers `vae/` folder converted in memory
`read_official_folder`      a raw official folder converted in memory
==========================  =====================================================================

Every file is read through `gmflow_jax.interop.folder_files`: errors name their file, and a
sharded index's shard names must stay inside the component folder. A config or state dict that
does not fit our networks is refused with a ValueError naming the file it came from.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from gmflow_jax.interop.folder_files import (
    INDEX_SUFFIX,
    errors_name_file,
    read_json,
    read_safetensors,
)
from gmflow_jax.interop.key_table import (
    convert_spectrum_state_dict,
    convert_transformer_state_dict,
    convert_vae_state_dict,
)
from gmflow_jax.interop.official_config import (
    gm_dit_config_from_official,
    spectrum_config_from_official,
)
from gmflow_jax.models.builder import gm_dit_from_params, spectrum_from_params
from gmflow_jax.models.gm_dit import GMDiT
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.vae import AutoencoderKL, VAEConfig, vae_from_params

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
        for name in (f"{stem}.safetensors", f"{stem}{INDEX_SUFFIX}"):
            tried.append(name)
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{folder!r} holds none of the weights files {tried}")


def read_component(
    root: str, component: str, variant: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """(config dict, state dict, weights path) of `root/component` of an official folder."""
    folder = os.path.join(root, component)
    config = read_json(os.path.join(folder, "config.json"))
    weights = find_weights_file(folder, variant)
    return config, read_safetensors(weights), weights


def vae_config_of(path: str, dtype: Any = "float32") -> VAEConfig:
    """`VAEConfig` of a diffusers-style VAE config file at `path` (its errors name the file)."""
    fields = read_json(path)
    with errors_name_file(path):
        config = VAEConfig.from_diffusers(fields)
    return dataclasses.replace(config, dtype=dtype)  # our option: its errors are not the file's


def convert_vae_weights(weights: str, config: VAEConfig) -> dict[str, np.ndarray]:
    """Our float32 VAE params of a diffusers safetensors file (or index) at `weights`."""
    state_dict = read_safetensors(weights)
    with errors_name_file(weights):
        return convert_vae_state_dict(state_dict, config)


def convert_transformer_component(
    root: str, variant: str | None, **overrides: Any
) -> tuple[Any, dict[str, np.ndarray], str]:
    """(`GMDiTConfig`, our float32 params, weights path) of `root/transformer`."""
    config_dict, sd, weights = read_component(root, "transformer", variant)
    with errors_name_file(os.path.join(root, "transformer", "config.json")):
        config = gm_dit_config_from_official(config_dict)
    config = dataclasses.replace(
        config, **overrides
    )  # our options: their errors are not the file's
    with errors_name_file(weights):
        return config, convert_transformer_state_dict(sd, config), weights


def convert_spectrum_component(
    root: str, variant: str | None
) -> tuple[dict[str, list[int]], dict[str, np.ndarray], str]:
    """(`{"base_size", "layers"}`, our float32 params, weights path) of `root/spectrum_net`."""
    spec_dict, spec_sd, weights = read_component(root, "spectrum_net", variant)
    with errors_name_file(os.path.join(root, "spectrum_net", "config.json")):
        spec_cfg = spectrum_config_from_official(spec_dict)
    with errors_name_file(weights):
        params = convert_spectrum_state_dict(spec_sd, spec_cfg["base_size"], spec_cfg["layers"])
    return spec_cfg, params, weights


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
    config = vae_config_of(os.path.join(folder, "config.json"), dtype)
    params = convert_vae_weights(find_weights_file(folder, variant), config)
    return vae_from_params(config, params)


def read_official_folder(
    root: str, variant: str | None, scan_blocks: bool, dtype: Any, with_vae: bool
) -> OfficialModels:
    """A raw official folder converted in memory (`dtype`: compute dtype of GM-DiT and VAE)."""
    config, params, _ = convert_transformer_component(
        root, variant, scan_blocks=scan_blocks, dtype=dtype
    )
    transformer = gm_dit_from_params(config, params)
    del params
    spectrum = None
    if os.path.isdir(os.path.join(root, "spectrum_net")):
        spec_cfg, params, _ = convert_spectrum_component(root, variant)
        spectrum = spectrum_from_params(spec_cfg["base_size"], spec_cfg["layers"], params)
    vae = None
    if with_vae and os.path.isdir(os.path.join(root, "vae")):
        vae = read_vae_folder(os.path.join(root, "vae"), variant, dtype)
    return OfficialModels(transformer, spectrum, vae)

"""Our converted form of the official checkpoint: writing it, and loading either form.

`convert_official_folder` (the library side of `tools/convert_official_checkpoint.py`) writes:

==================================  ===========================================================
file                                content
==================================  ===========================================================
`gmflow_jax_official.json`          manifest: format version, source folder, weights files,
                                    block layout ("list" or "scan"), components
`transformer/gmdit_config.json`     the `GMDiTConfig` fields (JSON)
`transformer/gmdit_params.npz`      float32 parameters keyed by dotted path (`blocks.0.attn_q.kernel`)
`spectrum_net/spectrum_config.json` `{"base_size": [C, H0, W0], "layers": [n1, n2]}`
`spectrum_net/spectrum_params.npz`  float32 SpectrumMLP parameters (`linear_1.kernel`, ...)
`vae/vae_params.npz`, `vae/vae_config.json`  as `tools/convert_vae.py` writes them (`load_vae`)
==================================  ===========================================================

`load_official(path)` reads either form (this converted folder, or the raw diffusers folder, which
`gmflow_jax.interop.diffusers_folder` converts in memory) and returns the Flax modules.

==========================  =====================================================================
name                        what it is
==========================  =====================================================================
`convert_official_folder`   raw official folder -> converted folder (files above)
`is_converted_folder`       whether a path holds a converted folder (its manifest)
`load_official`             GM-DiT, SpectrumMLP (float32) and VAE of either form
`load_vae_folder`           a VAE from a converted folder or a diffusers `vae/` folder
==========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from gmflow_jax.atomic_file import write_json_atomic, write_npz_atomic
from gmflow_jax.interop.diffusers_folder import (
    OfficialModels,
    find_weights_file,
    is_official_folder,
    read_component,
    read_json,
    read_official_folder,
    read_safetensors,
    read_vae_folder,
)
from gmflow_jax.interop.key_table import (
    convert_spectrum_state_dict,
    convert_transformer_state_dict,
)
from gmflow_jax.interop.official_config import (
    gm_dit_config_from_official,
    spectrum_config_from_official,
)
from gmflow_jax.models.builder import (
    gm_dit_config_from_dict,
    gm_dit_config_to_dict,
    gm_dit_from_params,
    spectrum_from_params,
)
from gmflow_jax.models.flat_params import stack_blocks, unstack_blocks
from gmflow_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    convert_diffusers_state_dict,
    load_vae,
)

MANIFEST_NAME = "gmflow_jax_official.json"
"""Manifest of a converted folder."""

FORMAT_VERSION = 1
"""Version of the converted-folder format."""

GMDIT_CONFIG_NAME = "gmdit_config.json"
GMDIT_PARAMS_NAME = "gmdit_params.npz"
SPECTRUM_CONFIG_NAME = "spectrum_config.json"
SPECTRUM_PARAMS_NAME = "spectrum_params.npz"
VAE_CONFIG_NAME = "vae_config.json"
VAE_PARAMS_NAME = "vae_params.npz"


def is_converted_folder(path: str) -> bool:
    """Whether `path` holds a folder written by `convert_official_folder` (its manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def load_vae_folder(
    folder: str, *, variant: str | None = None, dtype: Any = "float32"
) -> AutoencoderKL:
    """A VAE from a converted folder (`vae_params.npz`) or a diffusers `vae/` folder."""
    if os.path.isfile(os.path.join(folder, VAE_PARAMS_NAME)):
        return load_vae(os.path.join(folder, VAE_PARAMS_NAME), dtype=dtype)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return read_vae_folder(folder, variant, dtype)
    raise FileNotFoundError(
        f"VAE folder {folder!r} holds neither {VAE_PARAMS_NAME!r} (converted) nor config.json "
        "(diffusers)"
    )


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _load_converted(
    root: str, scan_blocks: bool | None, dtype: Any, with_vae: bool
) -> OfficialModels:
    """Load a folder written by `convert_official_folder`."""
    manifest = read_json(os.path.join(root, MANIFEST_NAME))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root!r} has format_version={manifest.get('format_version')!r}; this code reads "
            f"version {FORMAT_VERSION}: convert the official folder again"
        )
    fields = read_json(os.path.join(root, "transformer", GMDIT_CONFIG_NAME))
    stored = gm_dit_config_from_dict(fields)
    want_scan = stored.scan_blocks if scan_blocks is None else scan_blocks
    config = dataclasses.replace(stored, scan_blocks=want_scan, dtype=dtype)
    params = _load_npz(os.path.join(root, "transformer", GMDIT_PARAMS_NAME))
    if stored.scan_blocks and not want_scan:
        params = unstack_blocks(params, config.num_layers)
    elif want_scan and not stored.scan_blocks:
        params = stack_blocks(params, config.num_layers)
    transformer = gm_dit_from_params(config, params)
    del params
    spectrum = None
    spec_dir = os.path.join(root, "spectrum_net")
    if os.path.isfile(os.path.join(spec_dir, SPECTRUM_PARAMS_NAME)):
        spec_cfg = read_json(os.path.join(spec_dir, SPECTRUM_CONFIG_NAME))
        spectrum = spectrum_from_params(
            spec_cfg["base_size"],
            spec_cfg["layers"],
            _load_npz(os.path.join(spec_dir, SPECTRUM_PARAMS_NAME)),
        )
    vae = None
    if with_vae and os.path.isfile(os.path.join(root, "vae", VAE_PARAMS_NAME)):
        vae = load_vae(os.path.join(root, "vae", VAE_PARAMS_NAME), dtype=dtype)
    return OfficialModels(transformer, spectrum, vae)


def load_official(
    path: str,
    *,
    variant: str | None = None,
    scan_blocks: bool | None = None,
    dtype: Any = "float32",
    with_vae: bool = True,
) -> OfficialModels:
    """The GM-DiT, SpectrumMLP (None if absent) and VAE (None if absent or not wanted) of `path`.

    `path` is a folder written by `convert_official_folder`, or the raw official diffusers folder
    (converted in memory; `variant` picks the weights file, e.g. "bf16"). `scan_blocks` None keeps
    the stored layout (the list layout for a raw folder). `dtype` is the compute dtype of the
    GM-DiT and the VAE; the SpectrumMLP computes in float32 (`models.image_denoiser`); parameters
    are float32.
    """
    if is_converted_folder(path):
        return _load_converted(path, scan_blocks, dtype, with_vae)
    if is_official_folder(path):
        return read_official_folder(path, variant, bool(scan_blocks), dtype, with_vae)
    raise FileNotFoundError(
        f"{path!r} is neither a converted folder (no {MANIFEST_NAME}) nor an official diffusers "
        "GM-DiT folder (no transformer/config.json)"
    )


def convert_official_folder(
    src: str,
    out_dir: str,
    *,
    variant: str | None = None,
    scan_blocks: bool = False,
    with_vae: bool = True,
) -> dict[str, Any]:
    """Convert the official folder `src` into `out_dir` (layout in the module docstring).

    Returns the manifest written (components, weights files read, parameter counts).
    """
    if not is_official_folder(src):
        raise FileNotFoundError(
            f"src={src!r} is not an official diffusers GM-DiT folder (no transformer/config.json)"
        )
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": os.path.abspath(src),
        "block_layout": "scan" if scan_blocks else "list",
        "components": [],
        "weights_files": {},
        "num_params": {},
    }

    config_dict, sd, weights = read_component(src, "transformer", variant)
    config = gm_dit_config_from_official(config_dict, scan_blocks=scan_blocks)
    params = convert_transformer_state_dict(sd, config)
    del sd
    os.makedirs(os.path.join(out_dir, "transformer"), exist_ok=True)
    write_npz_atomic(os.path.join(out_dir, "transformer", GMDIT_PARAMS_NAME), **params)
    write_json_atomic(
        os.path.join(out_dir, "transformer", GMDIT_CONFIG_NAME),
        gm_dit_config_to_dict(config),
        sort_keys=True,
    )
    manifest["components"].append("transformer")
    manifest["weights_files"]["transformer"] = os.path.basename(weights)
    manifest["num_params"]["transformer"] = int(sum(v.size for v in params.values()))
    del params

    if os.path.isdir(os.path.join(src, "spectrum_net")):
        spec_dict, spec_sd, weights = read_component(src, "spectrum_net", variant)
        spec_cfg = spectrum_config_from_official(spec_dict)
        params = convert_spectrum_state_dict(spec_sd, spec_cfg["base_size"], spec_cfg["layers"])
        os.makedirs(os.path.join(out_dir, "spectrum_net"), exist_ok=True)
        write_npz_atomic(os.path.join(out_dir, "spectrum_net", SPECTRUM_PARAMS_NAME), **params)
        write_json_atomic(
            os.path.join(out_dir, "spectrum_net", SPECTRUM_CONFIG_NAME), spec_cfg, sort_keys=True
        )
        manifest["components"].append("spectrum_net")
        manifest["weights_files"]["spectrum_net"] = os.path.basename(weights)
        manifest["num_params"]["spectrum_net"] = int(sum(v.size for v in params.values()))

    vae_src = os.path.join(src, "vae")
    if with_vae and os.path.isdir(vae_src):
        vae_config = VAEConfig.from_diffusers(read_json(os.path.join(vae_src, "config.json")))
        weights = find_weights_file(vae_src, variant)
        params = convert_diffusers_state_dict(read_safetensors(weights), vae_config)
        os.makedirs(os.path.join(out_dir, "vae"), exist_ok=True)
        write_npz_atomic(os.path.join(out_dir, "vae", VAE_PARAMS_NAME), **params)
        write_json_atomic(
            os.path.join(out_dir, "vae", VAE_CONFIG_NAME), vae_config.to_diffusers(), sort_keys=True
        )
        manifest["components"].append("vae")
        manifest["weights_files"]["vae"] = os.path.basename(weights)
        manifest["num_params"]["vae"] = int(sum(v.size for v in params.values()))

    write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest, sort_keys=True)
    return manifest

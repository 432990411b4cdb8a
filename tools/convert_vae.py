"""Convert a diffusers AutoencoderKL (`vae/` folder) to `gmflow_jax.models.vae` parameters (`docs/math.md` §4.8).

Input: a folder holding `config.json` and `diffusion_pytorch_model.safetensors` (e.g. a local copy of
`stabilityai/sd-vae-ft-ema`). Output, in `--out_dir`:

* `vae_params.npz`: one float32 array per parameter, keyed by dotted module path
  (`encoder.down_blocks.0.resnets.0.conv1.kernel`, ...; the key table is in the
  `gmflow_jax.models.vae` docstring);
* `vae_config.json`: the architecture as a diffusers-style config (`VAEConfig.to_diffusers`).

Load the result with `gmflow_jax.models.vae.load_vae(out_dir + "/vae_params.npz")`. The safetensors file
is read with `safetensors.numpy` (no torch). Every key is checked: unmapped or missing keys and shape
mismatches abort with a ValueError that lists them.

Usage:
  python tools/convert_vae.py --vae_dir /path/to/sd-vae-ft-ema --out_dir /path/to/out
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from safetensors.numpy import load_file

from gmflow_jax.atomic_file import write_json_atomic, write_npz_atomic
from gmflow_jax.models.vae import VAEConfig, convert_diffusers_state_dict

PARAMS_NAME = "vae_params.npz"
"""File name of the converted parameters in `--out_dir`."""

CONFIG_NAME = "vae_config.json"
"""File name of the converted config in `--out_dir`."""


def convert_vae_dir(
    vae_dir: str, out_dir: str, weights_name: str = "diffusion_pytorch_model.safetensors"
) -> tuple[str, str, int]:
    """Convert `vae_dir`/{config.json, weights_name}; return (params path, config path, #params)."""
    config_path = os.path.join(vae_dir, "config.json")
    weights_path = os.path.join(vae_dir, weights_name)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vae_dir={vae_dir!r} has no {os.path.basename(path)!r}")
    with open(config_path) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    params = convert_diffusers_state_dict(load_file(weights_path), config)
    os.makedirs(out_dir, exist_ok=True)
    params_out = os.path.join(out_dir, PARAMS_NAME)
    config_out = os.path.join(out_dir, CONFIG_NAME)
    write_npz_atomic(params_out, **params)
    write_json_atomic(config_out, config.to_diffusers(), sort_keys=True)
    return params_out, config_out, sum(v.size for v in params.values())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae_dir", required=True, help="diffusers vae folder (config + weights)")
    parser.add_argument("--out_dir", required=True, help="where to write the converted files")
    parser.add_argument(
        "--weights_name",
        default="diffusion_pytorch_model.safetensors",
        help="safetensors file name inside --vae_dir",
    )
    args = parser.parse_args(argv)
    params_out, config_out, n = convert_vae_dir(args.vae_dir, args.out_dir, args.weights_name)
    print(f"wrote {params_out} ({n:,} parameters) and {config_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

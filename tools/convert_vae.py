"""Convert a diffusers AutoencoderKL (`vae/` folder) to `gmflow_jax.models.vae` parameters (`docs/math.md` §4.8).

Input: a folder holding `config.json` and `diffusion_pytorch_model.safetensors` (or a `bf16` / `fp16`
variant, or a sharded index; e.g. a local copy of `stabilityai/sd-vae-ft-ema`). Output, in `--out_dir`:

* `vae_params.npz`: one float32 array per parameter, keyed by dotted module path
  (`encoder.down_blocks.0.resnets.0.conv1.kernel`, ...; the key table is
  `gmflow_jax.interop.key_table.convert_vae_state_dict`);
* `vae_config.json`: the architecture as a diffusers-style config (`VAEConfig.to_diffusers`).

The folder is written beside `--out_dir` and renamed into place, so a failure part-way leaves an
existing `--out_dir` untouched; an existing `--out_dir` is replaced only when it is empty or an
earlier conversion (it holds `vae_params.npz`). Load the result with
`gmflow_jax.interop.converted_folder.load_vae_folder(out_dir)`. The safetensors file is read with
`safetensors.numpy` (no torch). Every key is checked: unmapped or missing keys, shape mismatches and
non-finite values abort. An error is printed as one line (`error: ...`) and the exit status is 1.
The library side is `gmflow_jax.interop.converted_folder.convert_vae_folder`.

Usage:
  python tools/convert_vae.py --vae_dir /path/to/sd-vae-ft-ema --out_dir /path/to/out [--variant bf16]
"""

from __future__ import annotations

import argparse
import sys

from gmflow_jax.interop.converted_folder import convert_vae_folder


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a multi-line key report joined with "; ")."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae_dir", required=True, help="diffusers vae folder (config + weights)")
    parser.add_argument("--out_dir", required=True, help="where to write the converted files")
    parser.add_argument(
        "--variant",
        default=None,
        choices=["bf16", "fp16"],
        help="weights variant to read first (default: the fp32 file; others are fallbacks)",
    )
    parser.add_argument(
        "--weights_name",
        default=None,
        help="safetensors file name inside --vae_dir (default: found by --variant)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert_vae_folder(
            args.vae_dir, args.out_dir, variant=args.variant, weights_name=args.weights_name
        )
    except (ValueError, OSError) as err:
        # Why no traceback: these are problems of the input folder, each named in the message.
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    print(
        f"wrote {out['params']} ({out['num_params']:,} parameters from {out['weights_file']}) "
        f"and {out['config']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert the official GM-DiT checkpoint (diffusers folder) to gmflow_jax parameters and configs.

Input: a local copy of the official pipeline folder, e.g. downloaded with

  python -c "from huggingface_hub import snapshot_download; snapshot_download('Lakonik/gmflow_imagenet_k8_ema', local_dir='gmflow_imagenet_k8_ema')"

holding `transformer/` and `spectrum_net/` (config.json + safetensors, fp32 or the `bf16` variant) and
`vae/`. Output, in `--out_dir`: `gmflow_jax_official.json` (manifest), `transformer/gmdit_config.json`
+ `gmdit_params.npz`, `spectrum_net/spectrum_config.json` + `spectrum_params.npz`, and
`vae/vae_config.json` + `vae_params.npz`, all float32. The folder is written beside `--out_dir` and
renamed into place, so a failure part-way leaves an existing `--out_dir` untouched; an existing
`--out_dir` is replaced only when it is empty or an earlier conversion (it holds the manifest). An
error is printed as one line (`error: ...`) and the exit status is 1. The key table is
`gmflow_jax.interop.key_table.KEY_TABLE`, the file layout `gmflow_jax.interop.converted_folder` (this
script is only its command line). Load the result with
`gmflow_jax.pipeline.GMFlowPipeline.from_official(out_dir)` or
`gmflow_jax.interop.converted_folder.load_official`.

Usage:
  python tools/convert_official_checkpoint.py --src gmflow_imagenet_k8_ema --out_dir gmflow_k8_jax [--variant bf16] [--scan_blocks] [--no_vae]
"""

from __future__ import annotations

import argparse
import sys

from gmflow_jax.interop.converted_folder import convert_official_folder


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a multi-line key report joined with "; ")."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="official diffusers pipeline folder")
    parser.add_argument("--out_dir", required=True, help="where to write the converted files")
    parser.add_argument(
        "--variant",
        default=None,
        choices=["bf16", "fp16"],
        help="weights variant to read first (default: the fp32 file; others are fallbacks)",
    )
    parser.add_argument(
        "--scan_blocks",
        action="store_true",
        help="store the blocks stacked for GMDiTConfig(scan_blocks=True) (default: a list)",
    )
    parser.add_argument("--no_vae", action="store_true", help="skip the vae/ folder")
    args = parser.parse_args(argv)
    try:
        manifest = convert_official_folder(
            args.src,
            args.out_dir,
            variant=args.variant,
            scan_blocks=args.scan_blocks,
            with_vae=not args.no_vae,
        )
    except (ValueError, OSError) as err:
        # Why no traceback: these are problems of the input folders, each named in the message.
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    for name in manifest["components"]:
        print(
            f"{name}: {manifest['num_params'][name]:,} parameters from "
            f"{manifest['weights_files'][name]}"
        )
    print(f"wrote {args.out_dir} ({manifest['block_layout']} block layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

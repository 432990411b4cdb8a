"""Convert the PyTorch FID Inception weights to the .npz that `load_fid_inception` reads.

Input: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's port of TF's inception-2015-12-05, the
network of the ADM evaluator), or an .npz holding the same state_dict (same key names, numpy arrays).
Reading a .pth needs PyTorch, which is not a dependency of gmflow_jax: it is imported only here, only
for a .pth. A file name ending in `-<hex digits>.pth` (the torch.hub convention) is checked against
the SHA-256 of its content. Every key's rename and axis permutation is `inception.PARAM_RULES`.

    python tools/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz
    python tools/convert_inception_weights.py state_dict.npz fid_inception.npz --verify
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

import numpy as np

from gmflow_jax.eval import inception


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """state_dict of a .pth (via torch, imported lazily) or .npz file, as numpy arrays."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if ext in (".pth", ".pt"):
        try:
            import torch
        except ImportError as err:
            raise SystemExit(
                f"reading {path} needs PyTorch (pip install torch), or convert the state_dict "
                "to an .npz of the same keys first"
            ) from err
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    raise SystemExit(f"input must be a .pth, .pt or .npz file, got {path}")


def check_hash_prefix(path: str) -> str:
    """SHA-256 of the file; raises SystemExit when a `-<hex>.pth` name disagrees with it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    match = re.search(r"-([0-9a-f]{6,64})\.pth?$", os.path.basename(path))
    if match and not sha.startswith(match.group(1)):
        raise SystemExit(
            f"{path}: SHA-256 {sha} does not start with {match.group(1)} from the file name "
            "(corrupt or different file)"
        )
    return sha


def verify(params: dict[str, np.ndarray]) -> None:
    """Run the converted network on one mid-grey 299x299 image and print a summary."""
    model = inception.inception_from_params(params)
    out = model(np.full((1, 299, 299, 3), 128.0, np.float32))
    pool, logits = np.asarray(out.pool), np.asarray(out.logits)
    print(
        f"verify: pool {pool.shape} mean {pool.mean():.4f} max {pool.max():.4f}; "
        f"logits {logits.shape} argmax {int(logits.argmax())}; spatial {out.spatial.shape}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: convert INPUT (.pth or .npz state_dict) to OUTPUT (.npz params)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="pt_inception-2015-12-05-6726825d.pth or a state_dict .npz")
    parser.add_argument("output", help="output .npz of gmflow_jax parameters")
    parser.add_argument("--verify", action="store_true", help="run the network once afterwards")
    args = parser.parse_args(argv)
    if not args.output.endswith(".npz"):
        raise SystemExit(f"output must end in .npz, got {args.output}")

    sha = check_hash_prefix(args.input)
    state_dict = read_state_dict(args.input)
    params = inception.convert_torch_state_dict(state_dict)
    inception.save_inception_params(params, args.output)
    n = sum(int(np.prod(v.shape)) for v in params.values())
    print(
        f"{args.input} (sha256 {sha[:16]}...): {len(params)} arrays, {n:,} values -> {args.output}"
    )
    if args.verify:
        verify(params)
    return 0


if __name__ == "__main__":
    sys.exit(main())

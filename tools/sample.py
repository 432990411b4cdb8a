"""Generate N class-conditional samples on every device and host, or run the guidance sweep.

The sampling logic is in `gmflow_jax.eval.adm_export` (index streams -> the sampling driver ->
decode, shard layout, resume, merge) and `gmflow_jax.eval.guidance_sweep` (the sweep); this file
parses and checks the flags, loads the model through `GMFlowPipeline`, builds the mesh and calls
them.

Every model we train samples here: GM (GMFlow) and mean-only (the flow-matching baseline: rows
euler, ddpm_small, ddpm_large, dpmpp_2m, dpmpp_2m_sde with CFG `--guidance_scale`, active when
> 1), latent (ImageNet: VAE-decoded) and pixel-space (the digits: the samples are the images,
uint8 [N, H, W, C]; no VAE needed). `--solver` defaults to gm_ode_2 for a GM model and euler for a
mean-only one; `--guidance_scale` to 0.45 (GM rows, probabilistic, [0, 1)) or 1 (baseline rows,
CFG, unguided).

Samples for the ADM evaluator (50,000 by default; shards + `samples.npz` in `--out_dir`):

  python tools/sample.py --official gmflow_k8_jax --out_dir samples/gmode2_32 \
      --solver gm_ode_2 --num_steps 32 --num_substeps 4 --guidance_scale 0.47 --seed 0

  python tools/sample.py --checkpoint runs/imagenet256 --out_dir samples/ours ...  # EMA weights
  python tools/sample.py --checkpoint runs/digits_baseline --step 3000 --out_dir samples/digits \
      --solver dpmpp_2m --num_steps 8 --guidance_scale 2 --num_samples 1000

Guidance sweep (`docs/paper-facts.md` §5: w in 0.02..0.75, GM-ODE 2 and GM-SDE 2 at NFE 8 and 32), scored with
the FID Inception (`tools/convert_inception_weights.py`) against an ADM reference batch:

  python tools/sample.py --official gmflow_k8_jax --out_dir sweep --sweep \
      --inception fid_inception.npz --reference VIRTUAL_imagenet256_labeled.npz

Every process of a multi-host job runs the same command (`jax.distributed` starts from the
environment, see `gmflow_jax.parallel.distributed`); `--out_dir` must be on a filesystem all
processes share for the merge and the sweep's result file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax

from gmflow_jax import guidance, solvers
from gmflow_jax.eval import adm_export, guidance_sweep
from gmflow_jax.eval.inception import load_fid_inception
from gmflow_jax.interop.converted_folder import load_official, load_vae_folder
from gmflow_jax.parallel.distributed import initialize_distributed
from gmflow_jax.parallel.mesh import MeshConfig, batch_split, make_mesh
from gmflow_jax.pipeline import GMFlowPipeline

MESH_FIELDS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp")
"""Keys `--mesh` accepts (the fields of `gmflow_jax.parallel.mesh.MeshConfig`)."""

DTYPES = ("float32", "bfloat16")
"""Compute dtypes of `--dtype`."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="one of our training workdirs (EMA weights + config.json)"
    )
    src.add_argument(
        "--official", help="the official checkpoint: converted or raw diffusers folder"
    )
    p.add_argument("--config", help="run config JSON for --checkpoint (default: in the workdir)")
    p.add_argument(
        "--step", type=int, help="checkpoint step of --checkpoint (default: the newest intact one)"
    )
    p.add_argument("--vae", help="VAE folder (converted or diffusers); default: the model's own")
    p.add_argument("--variant", help="weights variant of a raw official folder, e.g. bf16")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the model's)")
    p.add_argument("--out_dir", required=True, help="where shards, samples.npz and tables go")
    p.add_argument("--num_samples", type=int, default=adm_export.DEFAULT_NUM_SAMPLES)
    p.add_argument(
        "--batch_size",
        type=int,
        help=f"global batch (default {adm_export.DEFAULT_PER_DEVICE_BATCH} per data-parallel device)",
    )
    p.add_argument(
        "--solver",
        type=_sampler_arg,
        help=f"sampler row: {solvers.ALLOWED_FORMS} (default gm_ode_2, euler for a mean-only "
        "model)",
    )
    p.add_argument("--num_steps", type=int, help="outer steps = NFE (default 32)")
    p.add_argument(
        "--num_substeps", type=int, help="GM-ODE substeps (default ceil(128 / num_steps))"
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        help="GM rows: probabilistic w in [0, 1) (default 0.45); baseline rows: CFG w >= 0, "
        "active when > 1 (default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mesh",
        default="data=-1",
        help="mesh sizes as key=value pairs, keys " + ", ".join(MESH_FIELDS) + " (default data=-1)",
    )
    p.add_argument(
        "--uint8",
        choices=adm_export.UINT8_MODES,
        default="adm",
        help="adm: uint8(clip((x+1)*127.5)) as ADM's image_sample.py; round: round half up",
    )
    p.add_argument(
        "--xla_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="XLA compiler option of the sampling program (repeatable), e.g. "
        "xla_backend_optimization_level=0 for fast CPU compiles of small models",
    )
    p.add_argument("--save_latents", action="store_true", help="also store latents (arr_2)")
    p.add_argument("--no_merge", action="store_true", help="leave the shards unmerged")
    p.add_argument("--sweep", action="store_true", help="run the guidance sweep instead")
    p.add_argument(
        "--sweep_solvers",
        default=",".join(guidance_sweep.PAPER_SWEEP_SOLVERS),
        help="comma-separated GM solvers of the sweep",
    )
    p.add_argument(
        "--sweep_steps",
        default=",".join(str(s) for s in guidance_sweep.PAPER_SWEEP_STEPS),
        help="comma-separated NFEs of the sweep",
    )
    p.add_argument(
        "--sweep_guidance",
        default=",".join(f"{w:g}" for w in guidance_sweep.PAPER_GUIDANCE_GRID),
        help="comma-separated guidance scales of the sweep (default: the paper's grid)",
    )
    p.add_argument("--inception", help="FID Inception .npz (tools/convert_inception_weights.py)")
    p.add_argument("--reference", help="ADM reference batch .npz (images + mu/sigma)")
    return p


def _sampler_arg(text: str) -> str:
    """`--solver` value -> its canonical sampler row (the grammar of `gmflow_jax.solvers.config`)."""
    try:
        return solvers.canonical_sampler(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_mesh(text: str) -> MeshConfig:
    """`--mesh` "key=value,..." -> MeshConfig; data defaults to -1 unless another axis fills in."""
    given: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in MESH_FIELDS:
            raise ValueError(
                f"--mesh={text!r}: {item!r} must be key=value with key one of {', '.join(MESH_FIELDS)}"
            )
        try:
            given[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh={text!r}: {key}={value!r} must be an integer") from None
    fields = {"data": -1, "fsdp": 1, "tensor": 1}
    if any(given.get(k) == -1 for k in ("fsdp", "tensor")) and "data" not in given:
        fields["data"] = 1
    fields.update(given)
    try:
        return MeshConfig(**fields)
    except ValueError as e:
        raise ValueError(f"--mesh={text!r}: {e}") from None


def parse_xla_options(items: list[str]) -> dict[str, bool | int | float | str]:
    """`--xla_option` KEY=VALUE items -> {key: bool / int / float / str value}."""
    options: dict[str, bool | int | float | str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith("xla_"):
            raise ValueError(f"--xla_option={item!r} must be KEY=VALUE with an xla_* key")
        value: bool | int | float | str = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for convert in (int, float):
                try:
                    value = convert(text)
                    break
                except ValueError:
                    continue
        options[key] = value
    return options


def _int_list(flag: str, text: str) -> list[int]:
    """Comma-separated integers >= 1, else ValueError naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r} must be comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag}={text!r} must list integers >= 1")
    return values


def _float_list(flag: str, text: str) -> list[float]:
    """Comma-separated guidance scales in (0, 1), else ValueError naming the flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r} must be comma-separated numbers") from None
    bad = [v for v in values if not (math.isfinite(v) and 0.0 < v < 1.0)]
    if not values or bad:
        raise ValueError(
            f"{flag}={text!r}: every scale must be in (0, 1) (probabilistic guidance), got {bad}"
        )
    return values


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate flag values and fill defaults; ValueError names the flag, the value and what is allowed."""
    if args.num_samples < 1:
        raise ValueError(f"--num_samples={args.num_samples} must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size={args.batch_size} must be >= 1")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed={args.seed} must be in [0, 2^32)")
    for flag, path in (("--checkpoint", args.checkpoint), ("--official", args.official)):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{flag}={path!r} is not a directory")
    if args.vae is not None and not os.path.isdir(args.vae):
        raise ValueError(f"--vae={args.vae!r} is not a directory")
    if args.config is not None and args.checkpoint is None:
        raise ValueError("--config applies to --checkpoint only")
    if args.variant is not None and args.official is None:
        raise ValueError("--variant applies to --official only")
    if args.step is not None and args.checkpoint is None:
        raise ValueError("--step applies to --checkpoint only")
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step={args.step} must be a checkpoint step (>= 0)")
    args.mesh_config = parse_mesh(args.mesh)
    args.xla_options = parse_xla_options(args.xla_option)
    if args.sweep:
        single = [
            f for f in ("solver", "num_steps", "guidance_scale") if getattr(args, f) is not None
        ]
        if single:
            raise ValueError(
                f"--{single[0]} sets a single run; with --sweep use --sweep_solvers, "
                "--sweep_steps and --sweep_guidance"
            )
        names = [s.strip() for s in args.sweep_solvers.split(",") if s.strip()]
        rows, bad = [], []
        for name in names:
            try:
                rows.append(solvers.canonical_sampler(name))
            except ValueError:
                bad.append(name)
        bad += [r for r in rows if r not in guidance_sweep.SWEEP_SOLVERS]
        if bad or not rows:
            raise ValueError(
                f"--sweep_solvers={','.join(names)!r}: {bad} not allowed; allowed: "
                f"{', '.join(guidance_sweep.SWEEP_SOLVERS)} (probabilistic guidance needs a GM solver)"
            )
        args.sweep_solvers = rows
        args.sweep_steps = _int_list("--sweep_steps", args.sweep_steps)
        args.sweep_guidance = _float_list("--sweep_guidance", args.sweep_guidance)
        for flag in ("inception", "reference"):
            path = getattr(args, flag)
            if path is None:
                raise ValueError(
                    f"--sweep needs --{flag} (--inception: the .npz of "
                    "tools/convert_inception_weights.py; --reference: an ADM reference batch)"
                )
            if not os.path.isfile(path):
                raise ValueError(f"--{flag}={path!r} is not a file")
        if args.num_substeps is not None and args.num_substeps < 1:
            raise ValueError(f"--num_substeps={args.num_substeps} must be >= 1")
        return args
    args.num_steps = 32 if args.num_steps is None else args.num_steps
    if args.num_steps < 1:
        raise ValueError(f"--num_steps={args.num_steps} must be >= 1")
    if args.num_substeps is not None and args.num_substeps < 1:
        raise ValueError(f"--num_substeps={args.num_substeps} must be >= 1")
    w = args.guidance_scale
    if w is not None and not (math.isfinite(w) and w >= 0):
        raise ValueError(
            f"--guidance_scale={w} must be >= 0 (GM rows: [0, 1), probabilistic; baseline rows: "
            "CFG, active when > 1)"
        )
    if args.solver is not None:  # else the model's default row, checked once it is loaded
        check_row_args(args.solver, args.num_substeps, w)
    return args


def check_row_args(solver: str, num_substeps: int | None, w: float | None) -> None:
    """Substeps and guidance scale against the row's rules; ValueError naming the flag."""
    row = solvers.parse_sampler(solver)
    if (
        num_substeps is not None
        and num_substeps > 1
        and not (row.solver == "gm_ode" and row.substeps)
    ):
        raise ValueError(
            f"--num_substeps={num_substeps} needs a GM-ODE solver (gm_ode_2, gm_ode); "
            f"--solver={solver} runs 1 substep"
        )
    if w is None:
        return
    if row.is_gm and not 0.0 <= w < 1.0:
        raise ValueError(
            f"--guidance_scale={w} must be in [0, 1) for --solver={solver} (probabilistic "
            "guidance; 0 disables it; a CFG scale needs a baseline row such as euler)"
        )
    if not row.is_gm and w < 0:
        raise ValueError(
            f"--guidance_scale={w} must be >= 0 for --solver={solver} (CFG, active when > 1)"
        )
    guidance.check_guidance_scale(w, row.guidance)


def load_pipeline(args: argparse.Namespace) -> GMFlowPipeline:
    """The model of `--checkpoint` / `--official` with its VAE (or `--vae`)."""
    if args.checkpoint is not None:
        return GMFlowPipeline.from_checkpoint(
            args.checkpoint, step=args.step, config=args.config, vae=args.vae, dtype=args.dtype
        )
    dtype = args.dtype or "float32"
    models = load_official(
        args.official,
        variant=args.variant,
        scan_blocks=True,
        dtype=dtype,
        with_vae=args.vae is None,
    )
    vae = models.vae if args.vae is None else load_vae_folder(args.vae, dtype=dtype)
    return GMFlowPipeline(models.transformer, models.spectrum_net, vae)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a message for bad flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = check_args(args)
    except ValueError as e:
        parser.error(str(e))
    initialize_distributed()
    try:
        mesh = make_mesh(args.mesh_config)
    except ValueError as e:
        parser.error(f"--mesh={args.mesh!r}: {e}")
    split = batch_split(mesh)
    batch_size = args.batch_size or adm_export.DEFAULT_PER_DEVICE_BATCH * split
    if batch_size % split:
        parser.error(
            f"--batch_size={batch_size} must be divisible by the {split} data-parallel devices "
            f"(mesh data * fsdp over {jax.device_count()} devices)"
        )
    pipe = load_pipeline(args)
    if not pipe.has_vae and not pipe.pixel_space:
        parser.error(
            "the model samples latents and has no VAE: pass --vae DIR (a converted or diffusers "
            "VAE folder)"
        )
    if args.sweep and (pipe.pixel_space or pipe.mean_only):
        parser.error(
            "--sweep scores probabilistic guidance with the ImageNet Inception: it needs a latent "
            "GM model; sample this model without --sweep"
        )
    if not args.sweep:
        args.solver = args.solver or pipe.default_solver
        if args.guidance_scale is None:
            args.guidance_scale = pipe.default_guidance_scale(args.solver)
        try:
            check_row_args(args.solver, args.num_substeps, args.guidance_scale)
            cfg = pipe.solver_config(
                args.solver, args.num_steps, args.num_substeps, args.guidance_scale
            )
        except ValueError as e:
            parser.error(str(e))
    model_kind, model_path = (
        ("checkpoint", args.checkpoint) if args.checkpoint else ("official", args.official)
    )
    driver = pipe.sampling_driver(mesh, args.xla_options)

    def make_sampler(cfg):
        return adm_export.ShardedSampler(
            driver,
            cfg,
            num_classes=pipe.config.num_classes,
            latent_shape=pipe.latent_shape,
            vae=pipe.vae_parts,
            uint8_mode=args.uint8,
            with_latents=args.save_latents,
            compiler_options=args.xla_options,
        )

    if args.sweep:
        guidance_sweep.run_sweep(
            pipe.solver_config,
            make_sampler,
            mesh,
            out_dir=args.out_dir,
            inception=load_fid_inception(args.inception),
            reference_path=args.reference,
            solver_names=args.sweep_solvers,
            steps_list=args.sweep_steps,
            guidance_grid=args.sweep_guidance,
            num_substeps=args.num_substeps,
            num_samples=args.num_samples,
            batch_size=batch_size,
            seed=args.seed,
        )
        return 0
    settings = {
        "model": {
            "kind": model_kind,
            "path": os.path.abspath(model_path),
            # Why only when given: manifests of runs without --step stay as they were (resume).
            **({} if args.step is None else {"step": args.step}),
        },
        "vae": None if args.vae is None else os.path.abspath(args.vae),
        "dtype": pipe.config.compute_dtype.name,
        "solver": args.solver,
        "save_latents": bool(args.save_latents),
    }
    try:
        adm_export.generate_samples(
            make_sampler(cfg),
            args.out_dir,
            num_samples=args.num_samples,
            batch_size=batch_size,
            seed=args.seed,
            guidance_scale=args.guidance_scale,
            settings=settings,
            merge=not args.no_merge,
        )
    except adm_export.OutDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GM-DiT on an accelerator host: the bf16 train step (step time, images/s, MFU) and the sampler's
images/s for GM-SDE 2 and GM-ODE 2 at NFE 8, on synthetic latents. Writes a JSON and prints a table.

The train step is the run's own path (as `gmflow_jax.train.loop` builds it): `configs/imagenet256.py`
(GM-DiT-XL/2 K = 8 + SpectrumMLP, bf16 compute, remat, scanned blocks, transition GM-NLL + spectral
loss, AdamW, EMA), `init_on_mesh` on a mesh of every device (fsdp), `jit_train_step` with the state
donated. The global batch is `--batch_per_device` x devices. If XL/2 runs out of memory the script
falls back to L/2 and says so. MFU = model FLOPs of a step (`train.flops.gm_dit_train_flops`: the
forward's matmuls and attention products x 3) / (step seconds x the devices' dense bf16 peak from
`train.flops.KNOWN_CHIPS`); on a device not in that table (a CPU) the peak is measured with a
matmul (`measure_matmul_peak`, float32) and the MFU is against that.

Sampling uses the train state's EMA weights with the imagenet256 evaluation settings: GM-SDE 2 with
spectral sampling (guided, w = 0.3) and GM-ODE 2 with ceil(128 / 8) = 16 substeps (guided, w = 0.04),
8 steps each; a guided step runs the network on a 2B batch.

    python benchmarks/accelerator.py                         # one GPU / TPU host, under 5 minutes
    python benchmarks/accelerator.py --model L/2 --batch_per_device 128
    python benchmarks/accelerator.py --tiny                  # seconds on CPU (the test runs this)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.config_variant import load_config_file
from gmflow_jax.models.builder import build_model, gm_dit_config_from
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.models.gm_dit import DIT_SIZES
from gmflow_jax.parallel.mesh import make_mesh
from gmflow_jax.parallel.sharding import batch_sharding, check_rules
from gmflow_jax.train.flops import (
    devices_peak_flops,
    gm_dit_train_flops,
    measure_matmul_peak,
    model_flops_utilization,
)
from gmflow_jax.train.optimizer import make_adamw
from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step, step_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (configs/ lives there, outside the package)."""

SAMPLERS = (
    ("gm_sde_2", dict(solver="gm_sde", order=2, spectral=True, guidance_scale=0.3)),
    ("gm_ode_2", dict(solver="gm_ode", order=2, num_substeps=16, guidance_scale=0.04)),
)
"""The timed samplers (name, SolverConfig fields); NFE is `--nfe`."""

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
"""Substrings of an XLA out-of-memory error (the XL/2 -> L/2 fallback)."""


def bench_config(model: str, tiny: bool) -> Any:
    """imagenet256's config with the DiT size `model` ("XL/2", "L/2", ...); `tiny`: a CPU-sized one."""
    path = os.path.join(REPO, "configs", "imagenet256.py")
    config = load_config_file(path, "tiny" if tiny else "")
    size, _, patch = model.partition("/")
    if not tiny:
        layers, hidden, heads = DIT_SIZES[size]
        config.model.num_layers, config.model.hidden_size = layers, hidden
        config.model.num_heads, config.model.patch_size = heads, int(patch)
    config.model.dtype = "bfloat16"
    return config


def time_train_step(config: Any, batch_per_device: int, steps: int) -> dict[str, Any]:
    """Compile the run's train step on every device and time `steps` steps (after 2 warm-up steps)."""
    mesh = make_mesh(config.get("mesh"))
    rules = check_rules(tuple(config.mesh.rules), mesh)
    act_rules = check_rules(tuple(config.mesh.activation_rules), mesh)
    opt_cfg, ema_cfg, loss_cfg = step_settings(config)
    tx = make_adamw(opt_cfg)
    key = jax.random.PRNGKey(0)

    def model_fn() -> nnx.Module:
        return build_model(config.model, key)

    _, init, shardings = init_on_mesh(model_fn, tx, key, mesh, rules)
    denoiser, spectrum = network_functions(nnx.eval_shape(model_fn))
    step_fn = jit_train_step(
        make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum),
        mesh,
        shardings,
        act_rules,
    )
    cfg = gm_dit_config_from(config.model)
    batch = batch_per_device * jax.device_count()
    s, c = cfg.sample_size, cfg.in_channels
    data = jax.device_put(
        {
            "x0": jax.random.normal(key, (batch, s, s, c), jnp.float32),
            "labels": jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes,
        },
        batch_sharding(mesh),
    )
    state = init()
    t0 = time.perf_counter()
    state, metrics = step_fn(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, metrics = step_fn(state, data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, data)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} in the timed steps")
    return {
        "batch": batch,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "flops_per_step": gm_dit_train_flops(cfg, batch),
        "loss": loss,
        "state": state,
        "mesh": mesh,
        "denoiser": denoiser,
        "spectrum": spectrum,
        "cfg": cfg,
    }


def time_samplers(train: dict[str, Any], batch: int, nfe: int, reps: int) -> list[dict[str, Any]]:
    """Images/s of each of `SAMPLERS` at `nfe` steps on `batch` latents (EMA weights)."""
    cfg = train["cfg"]
    key = jax.random.PRNGKey(1)
    s, c = cfg.sample_size, cfg.in_channels
    sharding = batch_sharding(train["mesh"])
    noise = jax.device_put(jax.random.normal(key, (batch, s, s, c)), sharding)
    labels = jax.device_put(jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes, sharding)
    params = train["state"].ema_params
    rows = []
    for name, fields in SAMPLERS:
        scfg = solvers.SolverConfig(num_steps=nfe, null_label=cfg.num_classes, **fields)
        spectrum = train["spectrum"] if scfg.spectral else None

        def call(scfg=scfg, spectrum=spectrum):
            return solvers.sample(
                train["denoiser"], params, key, noise, labels, scfg, None, spectrum
            )

        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        compile_s = time.perf_counter() - t0
        if not bool(jnp.all(jnp.isfinite(out))):
            raise FloatingPointError(f"{name}: non-finite samples")
        t0 = time.perf_counter()
        for _ in range(reps):
            out = call()
        jax.block_until_ready(out)
        call_s = (time.perf_counter() - t0) / reps
        rows.append(
            {"sampler": name, "nfe": nfe, "batch": batch, "compile_s": compile_s,
             "call_s": call_s, "images_per_s": batch / call_s}
        )  # fmt: skip
    return rows


def is_oom(err: BaseException) -> bool:
    """Whether `err` is XLA running out of device memory."""
    return any(m in str(err) for m in OOM_MARKERS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, write the JSON, print the table; returns the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="XL/2", help="DiT size (falls back to L/2 on OOM)")
    parser.add_argument("--batch_per_device", type=int, default=256, help="train images per device")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--sample_batch_per_device", type=int, default=256, help="latents per call")
    parser.add_argument("--nfe", type=int, default=8, help="sampler steps")
    parser.add_argument("--sample_reps", type=int, default=3, help="timed sampler calls")
    parser.add_argument("--out", default="accelerator_benchmark.json", help="JSON output path")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_per_device, args.steps, args.sample_batch_per_device, args.sample_reps = (
            1,
            2,
            1,
            1,
        )
    for name in ("batch_per_device", "steps", "sample_batch_per_device", "nfe", "sample_reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")

    device = jax.devices()[0]
    models = [args.model] + (["L/2"] if args.model == "XL/2" and not args.tiny else [])
    fallback = None
    for model in models:
        try:
            train = time_train_step(
                bench_config(model, args.tiny), args.batch_per_device, args.steps
            )
            break
        except Exception as err:  # noqa: BLE001 - only an out-of-memory error falls back
            if model == models[-1] or not is_oom(err):
                raise
            fallback = f"{model} ran out of memory at batch {args.batch_per_device}/device"
            print(f"{fallback}; falling back to L/2", flush=True)
    peak = devices_peak_flops()
    peak_source = "data sheet (dense bf16)"
    if peak is None:
        peak = measure_matmul_peak(512 if args.tiny else 4096) * jax.device_count()
        peak_source = "measured float32 matmul"
    mfu = model_flops_utilization(train["flops_per_step"], train["step_s"], peak)
    samplers = time_samplers(
        train, args.sample_batch_per_device * jax.device_count(), args.nfe, args.sample_reps
    )
    payload = {
        "device": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "model": "tiny" if args.tiny else model,
        "fallback": fallback,
        "train": {
            k: train[k]
            for k in ("batch", "compile_s", "step_s", "images_per_s", "flops_per_step", "loss")
        },
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": mfu,
        "samplers": samplers,
    }
    payload["train"]["tflops_per_s"] = train["flops_per_step"] / train["step_s"] / 1e12
    write_json_atomic(args.out, payload)
    t = payload["train"]
    print(f"device: {jax.device_count()} x {device.device_kind}, jax {jax.__version__}")
    print(
        f"GM-DiT-{payload['model']} K={train['cfg'].num_gaussians}, bf16, global batch {t['batch']}"
    )
    print("| what | batch | compile s | s / call | images/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| train step | {t['batch']} | {t['compile_s']:.1f} | {t['step_s']:.4f} | "
        f"{t['images_per_s']:,.1f} | {100 * mfu:.1f}% ({peak_source}) |"
    )
    for r in samplers:
        print(
            f"| {r['sampler']} NFE {r['nfe']} | {r['batch']} | {r['compile_s']:.1f} | "
            f"{r['call_s']:.4f} | {r['images_per_s']:,.1f} | |"
        )
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

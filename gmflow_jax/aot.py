"""Compile a run's programs for a real TPU topology from a CPU host: memory, FLOPs and collectives.

    python -m gmflow_jax.aot --config=configs/imagenet256.py --topology=v5p:2x4x4
    python -m gmflow_jax.aot --config=configs/imagenet256.py --topology=v5e:4x4 \
        --config.train.batch_size=256 --sampler_batch_per_chip=125

`jax[tpu]` (libtpu, `requirements-test.txt`) describes the topology's devices with their real process
indices and physical placement (`jax.experimental.topologies.get_topology_desc`), and
`jax.jit(...).lower(...).compile()` runs the real TPU compiler on abstract inputs
(`jax.ShapeDtypeStruct` with shardings), without a TPU. The programs are the ones a run executes:

* the train step: the config's mesh (`parallel.mesh.make_mesh` on the topology's devices), the
  shape-first state shardings and `train.step.jit_train_step(make_train_step(...))`, global batch
  `config.train.batch_size`;
* the sampler: the sampling driver's chunk program (`sampling.driver`) for the config's first
  evaluation row and NFE, parameters replicated, `--sampler_batch_per_chip` images per chip (default
  `config.sample.batch_size` spread over the chips, rounded up).

For each it prints, per chip: arguments, outputs, aliased (donated) bytes, temporaries, peak memory
against the chip's HBM (`HBM_GIB`), FLOPs (XLA's cost analysis of the partitioned program), and the
collectives by kind with their count and bytes (result sizes per chip, parsed from the compiled HLO),
in the whole program and inside loop bodies (the layer scan, the sampler's scan). It exits with
status 1, naming the program and figures, when a peak exceeds the chip's HBM. With
`--list_loop_collectives` it also lists every in-loop collective (kind, per-chip result shape, count,
JAX op name), which tells parameter gathers and gradient reductions from activation collectives
(`models.logical_axes.constrain` puts the logical names into the op names).

Per-chip batch searches override the config, e.g. `--config.train.batch_size=3072` (192 per chip
on 16 chips) and `--config.model.remat=False` or `--config.model.remat_policy=save_linear_inputs`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from gmflow_jax import gm, solvers
from gmflow_jax.models.builder import build_model
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.parallel.mesh import MeshConfig, batch_split, make_mesh, mesh_shape
from gmflow_jax.parallel.sharding import (
    DEFAULT_ACTIVATION_RULES,
    DEFAULT_MIN_FSDP_SIZE,
    DEFAULT_PARAM_RULES,
    batch_sharding,
    check_rules,
    replicated,
)
from gmflow_jax.parallel.topology import HBM_GIB, topology_chip, topology_devices
from gmflow_jax.sampling import driver
from gmflow_jax.train.optimizer import make_adamw
from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step, step_settings
from gmflow_jax.train.task import run_keys

GIB = 2**30

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
    "collective-broadcast",
)
"""Collective kinds counted in the compiled HLO (async pairs are counted once, at their -done)."""

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_F8 = re.compile(r"f8e\w+")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e\d+m\d+\w*)?)\[([0-9,]*)\]")
_OP = re.compile(r" (" + "|".join(COLLECTIVES) + r")(-done)?\(")
_START = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_REF = re.compile(
    r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s]*(?:,\s*%[\w.\-]+)*)"
)


def _array_bytes(shape_text: str) -> int:
    """Bytes of every array shape (`bf16[8,4]{...}`) in an HLO result shape (a tuple sums)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape_text):
        size = _DTYPE_BYTES.get(dtype, 1 if _F8.fullmatch(dtype) else None)
        if size is None:
            continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective of a compiled (per-device) HLO module."""

    kind: str  # one of COLLECTIVES
    in_loop: bool  # in a computation reachable from a while body (the layer scan, a sampler scan)
    shape: str  # the result shape text (dtype[dims], or a tuple of them)
    bytes: int  # result bytes per device
    op_name: str  # the JAX op that produced it (HLO metadata), "" when absent


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective of a compiled (per-device) HLO module, in text order.

    Async pairs count once, at their -done (whose result is the collective's result); a collective is
    "in a loop" when its computation is reachable from a while body.
    """
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not _START.match(line):
            current = header.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    edges: dict[str, set[str]] = {}
    bodies: set[str] = set()
    for name, lines in computations.items():
        refs = set()
        for line in lines:
            for group in _REF.findall(line):
                refs.update(r.strip().lstrip("%") for r in group.split(",") if r.strip())
            for body in re.findall(r"body=%?([\w.\-]+)", line):
                bodies.add(body)
        edges[name] = {r for r in refs if r in computations}
    in_loops: set[str] = set()
    stack = list(bodies)
    while stack:
        name = stack.pop()
        if name in in_loops:
            continue
        in_loops.add(name)
        stack.extend(edges.get(name, ()))
    # Why the op name of a -done comes from its -start: XLA puts the metadata on the -start only.
    start_names = {}
    for lines in computations.values():
        for line in lines:
            if "-start(" in line and _START.match(line):
                meta = _OP_NAME.search(line)
                lhs = line.split("=", 1)[0].split()[-1].lstrip("%")
                start_names[lhs] = meta.group(1) if meta else ""
    ops = []
    for name, lines in computations.items():
        for line in lines:
            op = _OP.search(line)
            if op is None or not _START.match(line):
                continue
            shape = line[line.index("=") + 1 : op.start()].strip()
            meta = _OP_NAME.search(line)
            op_name = meta.group(1) if meta else ""
            if op.group(2) and not op_name:
                operand = re.search(r"-done\(%?([\w.\-]+)\)", line)
                op_name = start_names.get(operand.group(1), "") if operand else ""
            ops.append(
                CollectiveOp(op.group(1), name in in_loops, shape, _array_bytes(shape), op_name)
            )
    return ops


def collectives_of(hlo_text: str) -> dict[str, dict[str, dict[str, int]]]:
    """{"total" | "in_loops": {kind: {"count", "bytes"}}} of a compiled (per-device) HLO module.

    "in_loops" counts the collectives of computations reachable from a while body (the layer scan,
    the sampler's step scan); bytes are result sizes per device.
    """
    out: dict[str, dict[str, dict[str, int]]] = {"total": {}, "in_loops": {}}
    for op in collective_ops(hlo_text):
        for scope in ("total", "in_loops") if op.in_loop else ("total",):
            entry = out[scope].setdefault(op.kind, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += op.bytes
    return out


@dataclasses.dataclass
class ProgramReport:
    """Per-chip figures of one compiled program."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    flops: float
    collectives: dict[str, dict[str, dict[str, int]]]
    details: dict[str, Any]
    ops: list[CollectiveOp] = dataclasses.field(default_factory=list)


def report_of(name: str, compiled: Any, details: dict[str, Any]) -> ProgramReport:
    """The `ProgramReport` of a compiled program (memory analysis, cost analysis, HLO text)."""
    mem = compiled.memory_analysis()
    peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    # Why the max: XLA's peak covers the buffer-assignment peak; arguments + outputs - aliases +
    # temporaries is the upper bound MaxText reports; report the larger, never underestimate.
    peak = max(int(peak), int(live + mem.temp_size_in_bytes))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return ProgramReport(
        name=name,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        peak_bytes=peak,
        flops=float((cost or {}).get("flops", float("nan"))),
        collectives=collectives_of(hlo),
        details=details,
        ops=collective_ops(hlo),
    )


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (same structure)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _rules(config: ml_collections.ConfigDict, mesh: Any) -> tuple[Any, Any, int]:
    """(parameter rules, activation rules, min fsdp size) of `config.mesh` on `mesh`."""
    mesh_cfg = config.get("mesh") or {}
    rules = check_rules(tuple(mesh_cfg.get("rules", DEFAULT_PARAM_RULES)), mesh)
    act = check_rules(tuple(mesh_cfg.get("activation_rules", DEFAULT_ACTIVATION_RULES)), mesh)
    return rules, act, int(mesh_cfg.get("min_fsdp_size", DEFAULT_MIN_FSDP_SIZE))


def _latent_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """[H, W, C] of one training example of an image config."""
    m = config.model
    return (int(m.sample_size), int(m.sample_size), int(m.in_channels))


def _forms_of(mesh: Any):
    """Trace with the GM math's forms for the platform compiled for, not the host's.

    Why: `gm.cpu_reformulations()` asks the default backend, which is the CPU on the host that
    compiles a TPU topology here; the TPU program must get the native reductions it would get on a
    TPU host.
    """
    return gm.forced_forms(mesh.devices.flat[0].platform == "cpu")


def compile_train_step(config: ml_collections.ConfigDict, mesh: Any) -> ProgramReport:
    """Compile the run's train step on `mesh` for abstract state and batch; its report."""
    batch_size = int(config.train.batch_size)
    split = batch_split(mesh)
    if batch_size % split:
        raise ValueError(
            f"config.train.batch_size={batch_size} must be a multiple of data * fsdp = {split}"
        )
    rules, act_rules, min_fsdp = _rules(config, mesh)
    keys = run_keys(int(config.seed))
    opt_cfg, ema_cfg, loss_cfg = step_settings(config)
    tx = make_adamw(opt_cfg)

    def model_fn() -> nnx.Module:
        return build_model(config.model, keys["init"])

    _, init, shardings = init_on_mesh(model_fn, tx, keys["train"], mesh, rules, min_fsdp)
    state = _abstract(jax.eval_shape(init), shardings)
    denoiser, spectrum = network_functions(nnx.eval_shape(model_fn))
    bsh = batch_sharding(mesh)
    batch = {
        "x0": jax.ShapeDtypeStruct((batch_size, *_latent_shape(config)), np.float32, sharding=bsh)
    }
    if int(config.model.get("num_classes", 0) or 0) > 0:
        batch["labels"] = jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=bsh)
    step = jit_train_step(
        make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum),
        mesh,
        shardings,
        act_rules,
    )
    with _forms_of(mesh):
        lowered = step.lower(state, batch)
    compiled = lowered.compile()
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    return report_of(
        "train_step",
        compiled,
        {"global_batch": batch_size, "per_chip": batch_size // split, "params": num_params},
    )


def sampler_config(config: ml_collections.ConfigDict, has_spectrum: bool) -> solvers.SolverConfig:
    """The `SolverConfig` of the config's first evaluation row, NFE and guidance scale."""
    s, model = config.sample, config.model
    mean_only = bool(model.get("mean_only", False))
    row = (s.baseline_solvers if mean_only else s.gm_solvers)[0]
    nfe = (s.baseline_nfes if mean_only else s.gm_nfes)[0]
    w = (s.cfg_scales if mean_only else s.guidance_scales)[0]
    return solvers.row_solver_config(
        row,
        int(nfe),
        float(w),
        null_label=int(model.get("num_classes", -1)),
        substeps_total=int(s.get("gm_ode_substeps_total", 128)),
        shift=float(s.get("shift", 1.0)),
        orthogonal_guidance=float(s.get("orthogonal_guidance", 1.0)),
        has_spectrum=has_spectrum,
    )


def compile_sampler(
    config: ml_collections.ConfigDict, mesh: Any, batch_per_chip: int
) -> ProgramReport:
    """Compile the sampling driver's chunk program (`batch_per_chip` images per chip, parameters
    replicated, one solver key per chunk) on `mesh`; its report."""
    keys = run_keys(int(config.seed))
    model = nnx.eval_shape(lambda: build_model(config.model, keys["init"]))
    denoiser, spectrum = network_functions(model)
    params = nnx.state(model, nnx.Param)
    cfg = sampler_config(config, spectrum is not None)
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    size = batch_per_chip * batch_split(mesh)
    abstract_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params
    )
    noise = jax.ShapeDtypeStruct((size, *_latent_shape(config)), np.float32, sharding=bsh)
    labels = None
    if int(config.model.get("num_classes", 0) or 0) > 0:
        labels = jax.ShapeDtypeStruct((size,), np.int32, sharding=bsh)
    key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=rep)
    scale = jax.ShapeDtypeStruct((), np.float32, sharding=rep) if cfg.guided else None
    with _forms_of(mesh):
        lowered = driver.lower_chunk(
            denoiser, spectrum, cfg, mesh, abstract_params, noise, labels, key, scale
        )
    compiled = lowered.compile()
    return report_of(
        "sampler",
        compiled,
        {"per_chip": batch_per_chip, "chunk": size, "solver": cfg.solver, "nfe": cfg.num_steps},
    )


def _gib(n: float) -> str:
    """`n` bytes in GiB (MiB below 1 GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


_LAYOUT = re.compile(r"\{[^{}]*\}")


def loop_collective_lines(report: ProgramReport) -> list[str]:
    """One line per distinct in-loop collective (kind, result shape without layouts, op name),
    with its count: what a reader checks "only parameter gathers and gradient reductions" on."""
    groups: dict[tuple[str, str, str], int] = {}
    for op in report.ops:
        if op.in_loop:
            key = (op.kind, _LAYOUT.sub("", op.shape), op.op_name.split(")/", 1)[-1])
            groups[key] = groups.get(key, 0) + 1
    return [f"    {kind} {shape} x{n}  [{name}]" for (kind, shape, name), n in groups.items()]


def format_report(
    report: ProgramReport, hbm_bytes: int, list_loop_collectives: bool = False
) -> str:
    """Human-readable lines of one program's report (with every in-loop collective if asked)."""
    lines = [
        f"== {report.name} ({', '.join(f'{k}={v}' for k, v in report.details.items())})",
        f"  per chip: arguments {_gib(report.argument_bytes)}, outputs {_gib(report.output_bytes)}"
        f" (aliased {_gib(report.alias_bytes)}), temporaries {_gib(report.temp_bytes)}, "
        f"code {_gib(report.code_bytes)}",
        f"  peak {_gib(report.peak_bytes)} of {_gib(hbm_bytes)} HBM "
        f"({100 * report.peak_bytes / hbm_bytes:.1f}%)",
        f"  FLOPs per chip: {report.flops:.4g}",
    ]
    for scope in ("total", "in_loops"):
        found = report.collectives[scope]
        text = ", ".join(
            f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in sorted(found.items())
        )
        lines.append(f"  collectives {scope.replace('_', ' ')}: {text or 'none'}")
    if list_loop_collectives:
        lines.extend(loop_collective_lines(report))
    return "\n".join(lines)


def over_budget(reports: Sequence[ProgramReport], chip: str) -> list[str]:
    """One message per program whose peak exceeds the HBM of a `chip` chip, naming the figures."""
    hbm = HBM_GIB[chip] * GIB
    return [
        f"{r.name}: peak {_gib(r.peak_bytes)} per chip exceeds the {_gib(hbm)} HBM of a {chip} chip"
        for r in reports
        if r.peak_bytes > hbm
    ]


def run(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    num_slices: int = 1,
    sampler_batch_per_chip: int | None = None,
    programs: Sequence[str] = ("train_step", "sampler"),
    list_loop_collectives: bool = False,
    out: Any = sys.stdout,
) -> tuple[list[ProgramReport], list[str]]:
    """Compile `programs` of `config` for `topology`; print their reports; return (reports,
    over-budget messages: a peak over the chip's HBM, or the TPU compiler's own out-of-memory
    refusal, which leaves that program without a report)."""
    unknown = [p for p in programs if p not in ("train_step", "sampler")]
    if unknown:
        raise ValueError(f"programs must be train_step and/or sampler, got {unknown}")
    chip = topology_chip(topology)
    hbm = HBM_GIB[chip] * GIB
    devices = topology_devices(topology, num_slices)
    mesh = make_mesh(config.get("mesh") or MeshConfig(), devices=devices)
    hosts = len({d.process_index for d in devices})
    print(
        f"{topology} x{num_slices}: {len(devices)} chips, {hosts} hosts, mesh {dict(mesh_shape(mesh))}",
        file=out,
    )
    compiles = []
    if "train_step" in programs:
        compiles.append(("train_step", lambda: compile_train_step(config, mesh)))
    if "sampler" in programs:
        per_chip = sampler_batch_per_chip or -(-int(config.sample.batch_size) // batch_split(mesh))
        compiles.append(("sampler", lambda: compile_sampler(config, mesh, per_chip)))
    reports, refused = [], []
    for name, compile_program in compiles:
        try:
            report = compile_program()
        except jax.errors.JaxRuntimeError as e:
            # Why caught: the TPU compiler itself refuses a program whose buffers cannot fit in HBM
            # (RESOURCE_EXHAUSTED, naming the bytes); that is this command's answer, not a crash.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            message = str(e).strip().splitlines()[0]
            refused.append(f"{name}: the TPU compiler refused it on a {chip} chip: {message}")
            print(f"== {name}: does not fit: {message}", file=out)
            continue
        reports.append(report)
        print(format_report(report, hbm, list_loop_collectives), file=out)
    return reports, refused + over_budget(reports, chip)


_FLAGS: dict[str, Any] = {}
"""The command's flag holders, defined by `define_flags` when the module runs as a program."""


def define_flags() -> None:
    """Define the command's flags on absl's global flag values.

    Why not at import: `gmflow_jax.main` defines a `--config` flag too, and absl refuses a second
    definition in one process, so importing this module (tests, notebooks) must define nothing.
    """
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally with ':variant'."
    )
    _FLAGS["topology"] = flags.DEFINE_string(
        "topology", None, "TPU topology, e.g. v5p:2x4x4, v5e:4x4, v6e:4x4."
    )
    _FLAGS["num_slices"] = flags.DEFINE_integer(
        "num_slices", 1, "Number of slices (multi-slice over DCN)."
    )
    _FLAGS["sampler_batch_per_chip"] = flags.DEFINE_integer(
        "sampler_batch_per_chip",
        None,
        "Images per chip of the sampler (default: config.sample.batch_size spread).",
    )
    _FLAGS["programs"] = flags.DEFINE_list(
        "programs", ["train_step", "sampler"], "Programs to compile."
    )
    _FLAGS["list_loop_collectives"] = flags.DEFINE_bool(
        "list_loop_collectives", False, "Also print every collective inside a loop, with its shape."
    )


def main(argv: Sequence[str]) -> None:
    """Compile for `--topology`; exit 1 naming the figure when a peak exceeds the chip's HBM."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    value = {name: holder.value for name, holder in _FLAGS.items()}
    if value["config"] is None or not value["topology"]:
        raise app.UsageError("--config and --topology are required")
    _, over = run(
        value["config"],
        value["topology"],
        num_slices=value["num_slices"],
        sampler_batch_per_chip=value["sampler_batch_per_chip"],
        programs=value["programs"],
        list_loop_collectives=value["list_loop_collectives"],
    )
    if over:
        for line in over:
            print(f"OUT OF MEMORY: {line}", file=sys.stderr)
        sys.exit(1)


def _setup_cpu_host() -> None:
    """Why: the compile needs no accelerator; keep JAX's own computations (keys, shapes) on the CPU
    and keep libtpu from querying a metadata server this host does not have."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":
    _setup_cpu_host()
    define_flags()
    app.run(main)

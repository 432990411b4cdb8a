"""Every config value checked before any work: `validate_config(config)` raises `ConfigError`.

One rule per field of `configs/checkerboard.py`, `configs/digits.py` and `configs/imagenet256.py`
(training, optimizer, EMA, loss, model, data, sampling rows / NFE / guidance / batch sizes,
evaluation, checkpoint, mesh, distributed), plus the rules that tie fields together (the model
fits the data set, heads divide the width, the patch divides the image). Fields a config does not
have are skipped, so the function serves every config. Each error is one line naming the field,
the value and what is allowed; the first error found is raised. Pure and fast (no devices, no
files except `checkpoint.restore_from`'s existence).

Sampler rows: `sample.gm_solvers` / `gm_rows` entries are GM rows of the one sampler grammar
(`solvers.config.parse_sampler`: `gm_sde[_2][_nospec]`, `gm_ode[_2][_nosub]`);
`sample.baseline_solvers` entries are baseline solver names (docs/math.md §5.1, §5.9). Guidance: probabilistic w in [0, 1) (§5.3), CFG w >= 0
(active when > 1, §5.9).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags

from gmflow_jax.config_variant import load_config_file
from gmflow_jax.solvers import BASELINE_SOLVERS, GM_SOLVERS
from gmflow_jax.solvers.config import parse_sampler

MODEL_NAMES = ("toy_mlp", "gm_dit")
DATA_NAMES = {
    "checkerboard": "toy_mlp",
    "checkerboard_classes": "toy_mlp",
    "digits": "gm_dit",
    "imagenet_latents": "gm_dit",
}
"""`data.name` -> the `model.name` it trains."""
DATA_SOURCES = ("files", "synthetic")
DIGITS_SIZES = (8, 16)
T_SAMPLERS = ("uniform", "logit_normal")
EMA_POLICIES = ("karras", "rampup", "fixed")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor")
REMAT_POLICIES = ("full", "save_linear_inputs")
MAX_LR = 1.0
"""Largest accepted learning rate (anything larger diverges at once with AdamW)."""


class ConfigError(ValueError):
    """A config value outside what is allowed (one line: field, value, allowed)."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(field: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = " and ".join(
            b
            for b in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "")
            if b
        )
        _fail(field, v, f"must be an integer{' ' + bounds if bounds else ''}")


def _real(
    field: str,
    v: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    ok = _is_real(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        _fail(field, v, f"must be a finite number in {left}{lo_s}, {hi_s}{right}")


def _bool(field: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(field, v, "must be True or False")


def _choice(field: str, v: Any, allowed: tuple) -> None:
    if v not in allowed:
        _fail(field, v, f"must be one of {', '.join(map(repr, allowed))}")


def _str(field: str, v: Any) -> None:
    if not isinstance(v, str):
        _fail(field, v, "must be a string")


def _file_name(field: str, v: Any) -> None:
    if not isinstance(v, str) or not v or os.sep in v or v in (".", ".."):
        _fail(field, v, "must be a plain, non-empty file name (written inside the workdir)")


def _int_list(field: str, v: Any, lo: int = 1) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        _fail(field, v, f"must be a non-empty list of integers >= {lo}")
    for i, x in enumerate(v):
        _int(f"{field}[{i}]", x, lo)


def _real_list(field: str, v: Any, check: Callable[[str, Any], None]) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        _fail(field, v, "must be a non-empty list of numbers")
    for i, x in enumerate(v):
        check(f"{field}[{i}]", x)


def _gm_row(field: str, row: Any) -> None:
    """A GM row of the one sampler grammar (`solvers.config.parse_sampler`)."""
    try:
        parsed = parse_sampler(row)
    except ValueError as err:
        _fail(field, row, str(err))
    if parsed.solver not in GM_SOLVERS:
        _fail(field, row, f"a GM row needs a GM solver ({', '.join(GM_SOLVERS)})")


class _Section:
    """Field access of one config section with its dotted prefix (absent fields are skipped)."""

    def __init__(self, config: ml_collections.ConfigDict, prefix: str):
        self.cfg = config.get(prefix) if prefix else config
        self.prefix = prefix

    def __bool__(self) -> bool:
        return self.cfg is not None

    def has(self, name: str) -> bool:
        return self.cfg is not None and name in self.cfg

    def __getitem__(self, name: str) -> Any:
        return self.cfg[name]

    def check(self, name: str, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if self.has(name):
            fn(f"{self.prefix}.{name}" if self.prefix else name, self.cfg[name], *args, **kwargs)


def _check_model(config: ml_collections.ConfigDict) -> None:
    m = _Section(config, "model")
    if not m:
        _fail("model", None, "a model section is required")
    m.check("name", _choice, MODEL_NAMES)
    m.check("num_gaussians", _int, 1)
    m.check("mean_only", _bool)
    m.check("embed_dim", _int, 1)
    m.check("hidden_dim", _int, 1)
    m.check("num_layers", _int, 1)
    m.check("pos_min_period", _real, 0.0, lo_open=True)
    m.check("pos_max_period", _real, 0.0, lo_open=True)
    if m.has("pos_min_period") and m.has("pos_max_period"):
        if m["pos_max_period"] <= m["pos_min_period"]:
            _fail("model.pos_max_period", m["pos_max_period"], "must exceed model.pos_min_period")
    m.check("hidden_size", _int, 1)
    m.check("num_heads", _int, 1)
    if m.has("hidden_size") and m.has("num_heads") and m["hidden_size"] % m["num_heads"]:
        _fail(
            "model.num_heads", m["num_heads"], f"must divide model.hidden_size={m['hidden_size']}"
        )
    m.check("patch_size", _int, 1)
    m.check("in_channels", _int, 1)
    m.check("sample_size", _int, 1)
    if m.has("sample_size") and m.has("patch_size") and m["sample_size"] % m["patch_size"]:
        _fail(
            "model.patch_size", m["patch_size"], f"must divide model.sample_size={m['sample_size']}"
        )
    m.check("num_classes", _int, 0)
    m.check("logstd_inner_dim", _int, 1)
    m.check("mlp_ratio", _real, 0.0, lo_open=True)
    m.check("dtype", _choice, MODEL_DTYPES)
    m.check("remat", _bool)
    m.check("remat_policy", _choice, REMAT_POLICIES)
    m.check("scan_blocks", _bool)
    s = _Section(config, "model.spectrum_net")
    if s:
        s.check("enabled", _bool)
        s.check("base_size", _int_list)
        if s.has("base_size") and len(s["base_size"]) != 3:
            _fail("model.spectrum_net.base_size", s["base_size"], "must be (C, H0, W0)")
        if s.has("base_size") and m.has("in_channels") and s["base_size"][0] != m["in_channels"]:
            _fail(
                "model.spectrum_net.base_size",
                s["base_size"],
                f"its C must equal model.in_channels={m['in_channels']}",
            )
        s.check("layers", _int_list)
        if s.has("layers") and len(s["layers"]) != 2:
            _fail("model.spectrum_net.layers", s["layers"], "must be the two hidden widths")


def _check_data(config: ml_collections.ConfigDict) -> None:
    d, m = _Section(config, "data"), _Section(config, "model")
    if not d or not d.has("name"):
        _fail("data.name", None, f"must be one of {', '.join(map(repr, DATA_NAMES))}")
    d.check("name", _choice, tuple(DATA_NAMES))
    if m.has("name") and m["name"] != DATA_NAMES[d["name"]]:
        _fail(
            "model.name",
            m["name"],
            f"data.name={d['name']!r} trains model.name={DATA_NAMES[d['name']]!r}",
        )
    d.check("image_size", _choice, DIGITS_SIZES)
    if d.has("image_size") and m.has("sample_size") and m["sample_size"] != d["image_size"]:
        _fail(
            "model.sample_size", m["sample_size"], f"must equal data.image_size={d['image_size']}"
        )
    if d["name"] == "digits":
        if m.has("in_channels") and m["in_channels"] != 1:
            _fail("model.in_channels", m["in_channels"], "digits are grey-scale: must be 1")
        if m.has("num_classes") and m["num_classes"] != 10:
            _fail("model.num_classes", m["num_classes"], "digits have 10 classes: must be 10")
    d.check("source", _choice, DATA_SOURCES)
    d.check("path", _str)
    if d.has("source") and d["source"] == "files" and d.has("path") and not d["path"]:
        _fail("data.path", d["path"], "data.source='files' needs the prepared latents directory")
    d.check("num_synthetic", _int, 1)
    d.check("include_ids", _bool)


def _check_train(config: ml_collections.ConfigDict) -> None:
    t = _Section(config, "train")
    if not t:
        _fail("train", None, "a train section is required")
    t.check("num_steps", _int, 1)
    t.check("batch_size", _int, 1)
    t.check("trans_ratio", _real, 0.0, 1.0, lo_open=True)
    t.check("weight_scale", _real, 0.0, lo_open=True)
    t.check("t_sampler", _choice, T_SAMPLERS)
    t.check("logit_normal_mean", _real)
    t.check("logit_normal_std", _real, 0.0, lo_open=True)
    t.check("shift", _real, 0.0, lo_open=True)
    t.check("log_every", _int, 1)
    t.check("prob_class", _real, 0.0, 1.0)
    t.check("spectral_loss_weight", _real, 0.0)
    t.check("max_consecutive_skips", _int, 1)
    o = _Section(config, "train.optimizer")
    o.check("lr", _real, 0.0, MAX_LR, lo_open=True)
    o.check("b1", _real, 0.0, 1.0, hi_open=True)
    o.check("b2", _real, 0.0, 1.0, hi_open=True)
    o.check("eps", _real, 0.0, lo_open=True)
    o.check("weight_decay", _real, 0.0)
    o.check("warmup_iters", _int, 0)
    o.check("warmup_ratio", _real, 0.0, 1.0, lo_open=True)
    o.check("grad_clip_norm", _real, 0.0)
    o.check("clip_begin", _int, 0)
    o.check("skip_nonfinite", _bool)
    e = _Section(config, "train.ema")
    e.check("policy", _choice, EMA_POLICIES)
    e.check("gamma", _real, 0.0)
    e.check("ema_kimg", _real, 0.0, lo_open=True)
    e.check("ema_rampup", _real, 0.0, lo_open=True)
    e.check("batch_size", _int, 1)
    e.check("eps", _real, 0.0, lo_open=True)
    e.check("beta", _real, 0.0, 1.0)


def _check_sample(config: ml_collections.ConfigDict) -> None:
    s = _Section(config, "sample")
    if not s:
        return
    if s.has("gm_solvers"):
        rows = s["gm_solvers"]
        if not isinstance(rows, (list, tuple)) or not rows:
            _fail("sample.gm_solvers", rows, "must be a non-empty list of GM rows")
        for i, row in enumerate(rows):
            _gm_row(f"sample.gm_solvers[{i}]", row)
    s.check("gm_nfes", _int_list)
    if s.has("baseline_solvers"):
        rows = s["baseline_solvers"]
        if not isinstance(rows, (list, tuple)) or not rows:
            _fail("sample.baseline_solvers", rows, "must be a non-empty list of baseline solvers")
        for i, row in enumerate(rows):
            _choice(f"sample.baseline_solvers[{i}]", row, BASELINE_SOLVERS)
    s.check("baseline_nfes", _int_list)
    s.check(
        "guidance_scales", _real_list, lambda f, w: _real(f, w, 0.0, 1.0, hi_open=True)
    )  # probabilistic guidance, docs/math.md §5.3
    s.check("cfg_scales", _real_list, lambda f, w: _real(f, w, 0.0))  # CFG, §5.9
    s.check("gm_ode_substeps_total", _int, 1)
    s.check("orthogonal_guidance", _real, 0.0, 1.0)
    s.check("shift", _real, 0.0, lo_open=True)
    s.check("batch_size", _int, 1)
    m = _Section(config, "model")
    guided = any(w > 0 for w in s.cfg.get("guidance_scales", ())) or any(
        w > 1 for w in s.cfg.get("cfg_scales", ())
    )
    if guided and m.has("num_classes") and m["num_classes"] < 1:
        _fail(
            "model.num_classes", m["num_classes"], "guided sampling needs a class-conditional model"
        )


def _check_eval(config: ml_collections.ConfigDict) -> None:
    e = _Section(config, "eval")
    if not e:
        return
    e.check("enabled", _bool)
    e.check("num_samples", _int, 1)
    e.check("per_class", _int, 1)
    e.check("grid_per_class", _int, 1)
    if e.has("grid_per_class") and e.has("per_class") and e["grid_per_class"] > e["per_class"]:
        _fail(
            "eval.grid_per_class",
            e["grid_per_class"],
            f"must be <= eval.per_class={e['per_class']}",
        )
    e.check("classifier_dir", _str)
    e.check("classifier_seed", _int, 0)
    e.check("save_samples", _int, 0)
    if e.has("save_samples") and e.has("num_samples") and e["save_samples"] > e["num_samples"]:
        _fail(
            "eval.save_samples",
            e["save_samples"],
            f"must be <= eval.num_samples={e['num_samples']}",
        )
    for name in ("metrics_file", "figure_file", "samples_file"):
        e.check(name, _file_name)


def _check_checkpoint(config: ml_collections.ConfigDict) -> None:
    c = _Section(config, "checkpoint")
    if not c:
        return
    c.check("every_steps", _int, 1)
    c.check("max_to_keep", _int, 1)
    c.check("async_save", _bool)
    c.check("restart", _bool)
    c.check("restore_from", _str)
    if c.has("restore_from") and c["restore_from"] and "://" not in c["restore_from"]:
        if not os.path.isdir(c["restore_from"]):
            _fail(
                "checkpoint.restore_from",
                c["restore_from"],
                "must be an existing checkpoint directory or ''",
            )


def _mesh_rules(field: str, rules: Any) -> None:
    if not isinstance(rules, (list, tuple)):
        _fail(field, rules, "must be a list of (logical axis, mesh axis | tuple | None) pairs")
    for i, rule in enumerate(rules):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            _fail(f"{field}[{i}]", rule, "must be a (logical axis, mesh axis | tuple | None) pair")
        target = rule[1]
        axes = (target,) if isinstance(target, str) else (target or ())
        for axis in axes:
            if axis not in MESH_AXES:
                _fail(f"{field}[{i}]", rule, f"mesh axes are {', '.join(MESH_AXES)}")


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    mesh = _Section(config, "mesh")
    if not mesh:
        return
    for axis in MESH_AXES:
        if mesh.has(axis) and (not _is_int(mesh[axis]) or (mesh[axis] < 1 and mesh[axis] != -1)):
            _fail(
                f"mesh.{axis}", mesh[axis], "must be an integer >= 1, or -1 (the remaining devices)"
            )
    if sum(1 for a in MESH_AXES if mesh.has(a) and mesh[a] == -1) > 1:
        _fail("mesh", {a: mesh[a] for a in MESH_AXES if mesh.has(a)}, "at most one axis may be -1")
    mesh.check("dcn_data", _int, 1)
    mesh.check("dcn_fsdp", _int, 1)
    mesh.check("rules", _mesh_rules)
    mesh.check("activation_rules", _mesh_rules)
    mesh.check("min_fsdp_size", _int, 1)
    d = _Section(config, "distributed")
    if d:
        d.check("coordinator_address", _str)
        d.check("num_processes", _int, 1)
        d.check("process_id", _int, 0)
        if d.has("process_id") and d.has("num_processes") and d["process_id"] >= d["num_processes"]:
            _fail(
                "distributed.process_id",
                d["process_id"],
                f"must be < distributed.num_processes={d['num_processes']}",
            )


def _check_top(config: ml_collections.ConfigDict) -> None:
    if "seed" in config:
        _int("seed", config.seed, 0, 2**32 - 1)
    p = _Section(config, "profile")
    p.check("skip_steps", _int, 0)
    p.check("num_steps", _int, 0)
    p.check("all_hosts", _bool)
    e = _Section(config, "eval")
    e.check("every_steps", _int, 0)
    e.check("periodic_samples", _int, 1)
    e.check("grid_nfe", _int, 1)
    s = _Section(config, "sample")
    if s.has("gm_rows"):
        for i, row in enumerate(s["gm_rows"]):
            _gm_row(f"sample.gm_rows[{i}]", row)
    if s.has("gm_cfg_rows"):
        for i, row in enumerate(s["gm_cfg_rows"]):
            _gm_row(f"sample.gm_cfg_rows[{i}]", row)
    s.check("guidance_nfes", _int_list)


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a `path[:variant]` config flag value."""
    path, _, variant = spec.partition(":")
    return load_config_file(path, variant)


def unknown_override(argv: Sequence[str], flag: str = "config") -> str | None:
    """A one-line description of the first `--config.a.b=v` naming a field the config lacks."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
    if spec is None:
        return None
    config = _load_config_file(spec)
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        name = arg[len(flag) + 3 :].split("=", 1)[0]
        node: Any = config
        for i, part in enumerate(name.split(".")):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(name.split(".")[:i]) or "config"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return (
                    f"unknown config field {flag}.{name} in {arg!r}; fields of {where}: "
                    f"{', '.join(known)}"
                )
            node = node[part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for `app.run(main, flags_parser=parse_flags)`: a bad `--config.x=v`
    (unknown field, wrong type) exits with status 2 and one line, without a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.stderr.write(f"FATAL Flags parsing error: {err}\n")
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        try:
            line = unknown_override(argv)
        except Exception:  # noqa: BLE001 - fall back to ml_collections' own message
            line = None
        sys.stderr.write(f"FATAL Config override error: {line or f'{type(err).__name__}: {err}'}\n")
        sys.exit(2)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise `ConfigError` for the first bad value of `config` (see the module docstring)."""
    _check_top(config)
    _check_model(config)
    _check_data(config)
    _check_train(config)
    _check_sample(config)
    _check_eval(config)
    _check_checkpoint(config)
    _check_mesh(config)

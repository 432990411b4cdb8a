"""Import of the official diffusers-format GM-DiT checkpoint (`Lakonik/gmflow_imagenet_k8_ema`).

Spec: `official-checkpoint-keys.md` (every official key and shape), `gmflow-math.md` §6.1 (GM-DiT),
§6.3 (SpectrumMLP), §8.1-8.2 (the checkpoint's config). The VAE (`vae/`) is converted by
`gmflow_jax.models.vae.convert_diffusers_state_dict` (its own key table, §4.8).

The official folder (a diffusers pipeline) holds `transformer/` and `spectrum_net/`, each a
`config.json` and a safetensors file: `diffusion_pytorch_model.safetensors` (fp32) or a variant
`diffusion_pytorch_model.<variant>.safetensors` (`bf16`, `fp16`), or a sharded file with its
`.safetensors.index.json`; and `vae/` in the same form. Arrays are read with `safetensors.numpy`
(no torch) and converted to float32.

`KEY_TABLE` below is the one table of the conversion: for every official key (with `{i}` the block
index 0..L-1) our parameter path (list-of-blocks layout) and the transform:

=========  ===============================================================================
transform  what it does
=========  ===============================================================================
`copy`     the array as is (biases, the label table)
`linear`   a torch Linear weight `(out, in)` -> our kernel `(in, out)` (transpose)
`patch`    the patch conv weight `(D, C, p, p)` -> our patch kernel `(p*p*C, D)`:
           `W.transpose(2, 3, 1, 0).reshape(p*p*C, D)` (patch vector index `(a*p + b)*C + c`)
`fixed`    a non-trainable buffer (the sin-cos position table `[1, N, D]`), only present in some
           diffusers versions: checked equal to `sincos_position_embedding_2d`, not stored
=========  ===============================================================================

With `scan_blocks=True` (the stacked layout of `GMDiT`) the per-block arrays `blocks.{i}.X` are
stacked in block order into `blocks.X` with a leading `[num_layers]` axis (`stack_blocks`).

Converted folder (written by `convert_official_folder`, i.e. `tools/convert_official_checkpoint.py`):

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

`load_official(path)` reads either form (the converted folder, or the raw diffusers folder, which
it converts in memory) and returns the Flax modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from gmflow_jax.atomic_file import write_json_atomic, write_npz_atomic
from gmflow_jax.models.embeddings import sincos_position_embedding_2d
from gmflow_jax.models.gm_dit import MLP_NORM_EPS, GMDiT, GMDiTConfig
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    convert_diffusers_state_dict,
    load_vae,
    vae_from_params,
)

# --------------------------------------------------------------------------------------------
# The key table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of the conversion table: official key -> our parameter path, with a transform."""

    component: str  # "transformer" or "spectrum_net" (the official sub-folder)
    official: str  # official key; "{i}" is the transformer block index
    ours: str  # our dotted parameter path (list-of-blocks layout); "" for a `fixed` buffer
    transform: str  # "copy", "linear", "patch" or "fixed" (module docstring)
    optional: bool = False  # the key may be absent from the official file


KEY_TABLE: tuple[KeyRule, ...] = (
    # GM-DiT (§6.1) ------------------------------------------------------------------------
    KeyRule("transformer", "pos_embed.proj.weight", "patch_embed.kernel", "patch"),
    KeyRule("transformer", "pos_embed.proj.bias", "patch_embed.bias", "copy"),
    KeyRule("transformer", "pos_embed.pos_embed", "", "fixed", optional=True),
    KeyRule(
        "transformer",
        "emb.timestep_embedder.linear_1.weight",
        "time_embed.linear_1.kernel",
        "linear",
    ),
    KeyRule(
        "transformer", "emb.timestep_embedder.linear_1.bias", "time_embed.linear_1.bias", "copy"
    ),
    KeyRule(
        "transformer",
        "emb.timestep_embedder.linear_2.weight",
        "time_embed.linear_2.kernel",
        "linear",
    ),
    KeyRule(
        "transformer", "emb.timestep_embedder.linear_2.bias", "time_embed.linear_2.bias", "copy"
    ),
    KeyRule(
        "transformer",
        "emb.class_embedder.embedding_table.weight",
        "label_embed.embedding",
        "copy",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.norm1.linear.weight",
        "blocks.{i}.adaln_modulation.kernel",
        "linear",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.norm1.linear.bias",
        "blocks.{i}.adaln_modulation.bias",
        "copy",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.attn1.to_q.weight",
        "blocks.{i}.attn_q.kernel",
        "linear",
    ),
    KeyRule(
        "transformer", "transformer_blocks.{i}.attn1.to_q.bias", "blocks.{i}.attn_q.bias", "copy"
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.attn1.to_k.weight",
        "blocks.{i}.attn_k.kernel",
        "linear",
    ),
    KeyRule(
        "transformer", "transformer_blocks.{i}.attn1.to_k.bias", "blocks.{i}.attn_k.bias", "copy"
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.attn1.to_v.weight",
        "blocks.{i}.attn_v.kernel",
        "linear",
    ),
    KeyRule(
        "transformer", "transformer_blocks.{i}.attn1.to_v.bias", "blocks.{i}.attn_v.bias", "copy"
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.attn1.to_out.0.weight",
        "blocks.{i}.attn_out.kernel",
        "linear",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.attn1.to_out.0.bias",
        "blocks.{i}.attn_out.bias",
        "copy",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.ff.net.0.proj.weight",
        "blocks.{i}.mlp_in.kernel",
        "linear",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.ff.net.0.proj.bias",
        "blocks.{i}.mlp_in.bias",
        "copy",
    ),
    KeyRule(
        "transformer",
        "transformer_blocks.{i}.ff.net.2.weight",
        "blocks.{i}.mlp_out.kernel",
        "linear",
    ),
    KeyRule(
        "transformer", "transformer_blocks.{i}.ff.net.2.bias", "blocks.{i}.mlp_out.bias", "copy"
    ),
    KeyRule("transformer", "proj_out_1.weight", "final_modulation.kernel", "linear"),
    KeyRule("transformer", "proj_out_1.bias", "final_modulation.bias", "copy"),
    KeyRule("transformer", "proj_out_2.weight", "final_proj.kernel", "linear"),
    KeyRule("transformer", "proj_out_2.bias", "final_proj.bias", "copy"),
    KeyRule("transformer", "gm_out.logstd_layers.1.weight", "logstd_hidden.kernel", "linear"),
    KeyRule("transformer", "gm_out.logstd_layers.1.bias", "logstd_hidden.bias", "copy"),
    KeyRule("transformer", "gm_out.logstd_layers.3.weight", "logstd_out.kernel", "linear"),
    KeyRule("transformer", "gm_out.logstd_layers.3.bias", "logstd_out.bias", "copy"),
    # SpectrumMLP (§6.3) -------------------------------------------------------------------
    KeyRule("spectrum_net", "mlp.0.weight", "linear_1.kernel", "linear"),
    KeyRule("spectrum_net", "mlp.0.bias", "linear_1.bias", "copy"),
    KeyRule("spectrum_net", "mlp.2.weight", "linear_2.kernel", "linear"),
    KeyRule("spectrum_net", "mlp.2.bias", "linear_2.bias", "copy"),
    KeyRule("spectrum_net", "mlp.4.weight", "linear_out.kernel", "linear"),
    KeyRule("spectrum_net", "mlp.4.bias", "linear_out.bias", "copy"),
)
"""The one conversion table (module docstring); `{i}` rows repeat for every transformer block."""

TRANSFORMS = ("copy", "linear", "patch", "fixed")
"""The transforms used in `KEY_TABLE`."""

WEIGHTS_NAME = "diffusion_pytorch_model"
"""Stem of the diffusers weights file (`<stem>[.<variant>].safetensors`)."""

VARIANTS = (None, "bf16", "fp16")
"""Weights-file variants tried, after the requested one, in this order (None = the plain file)."""

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

# Defaults of the reference `_GMDiTTransformer2DModel.__init__` (used for keys a config omits).
_OFFICIAL_DIT_DEFAULTS: dict[str, Any] = {
    "num_gaussians": 16,
    "constant_logstd": None,
    "logstd_inner_dim": 1024,
    "gm_num_logstd_layers": 2,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def gm_dit_config_from_official(config: Mapping[str, Any], **overrides: Any) -> GMDiTConfig:
    """`GMDiTConfig` of an official `transformer/config.json` dict (plus field overrides).

    Raises ValueError for the options our GM-DiT does not implement (V2 heads, a constant log-std,
    a log-std head depth other than 2, other norms / activations / eps, out_channels != in_channels).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config)}")
    cls_name = str(config.get("_class_name", "GMDiTTransformer2DModel"))
    if "GMDiTTransformer2DModel" not in cls_name or cls_name.endswith("V2"):
        raise ValueError(
            f"transformer config _class_name must be the GM-DiT V1 class "
            f"('GMDiTTransformer2DModel' or '_GMDiTTransformer2DModel'), got {cls_name!r}"
        )
    c = {**_OFFICIAL_DIT_DEFAULTS, **config}
    required = {
        "constant_logstd": None,
        "gm_num_logstd_layers": 2,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
    }
    for key, want in required.items():
        if c[key] != want:
            raise ValueError(
                f"transformer config {key}={c[key]!r} is not supported; GM-DiT needs {want!r}"
            )
    if not math.isclose(float(c["norm_eps"]), MLP_NORM_EPS):
        raise ValueError(
            f"transformer config norm_eps={c['norm_eps']!r} is not supported; GM-DiT needs "
            f"{MLP_NORM_EPS}"
        )
    if c["out_channels"] not in (None, c["in_channels"]):
        raise ValueError(
            f"transformer config out_channels={c['out_channels']!r} must be null or equal "
            f"in_channels={c['in_channels']!r}"
        )
    fields = dict(
        num_layers=int(c["num_layers"]),
        hidden_size=int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
        num_heads=int(c["num_attention_heads"]),
        patch_size=int(c["patch_size"]),
        in_channels=int(c["in_channels"]),
        sample_size=int(c["sample_size"]),
        num_gaussians=int(c["num_gaussians"]),
        num_classes=int(c["num_embeds_ada_norm"]),
        logstd_inner_dim=int(c["logstd_inner_dim"]),
    )
    fields.update(overrides)
    return GMDiTConfig(**fields)


def gm_dit_config_to_dict(config: GMDiTConfig) -> dict[str, Any]:
    """The `GMDiTConfig` fields as a JSON-safe dict (dtype as its name)."""
    out = dataclasses.asdict(config)
    out["dtype"] = jnp.dtype(config.dtype).name
    return out


def gm_dit_config_from_dict(fields: Mapping[str, Any], **overrides: Any) -> GMDiTConfig:
    """`GMDiTConfig` from `gm_dit_config_to_dict` output (plus overrides); unknown keys raise."""
    known = {f.name for f in dataclasses.fields(GMDiTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"GM-DiT config has unknown fields {unknown}; allowed: {sorted(known)}")
    return GMDiTConfig(**{**fields, **overrides})


def spectrum_config_from_official(config: Mapping[str, Any]) -> dict[str, list[int]]:
    """`{"base_size": [C, H0, W0], "layers": [n1, n2]}` of an official `spectrum_net/config.json`."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config)}")
    base_size = [int(s) for s in config.get("base_size", (4, 32, 32))]
    layers = [int(n) for n in config.get("layers", (64, 8))]
    if len(base_size) != 3 or min(base_size) <= 0:
        raise ValueError(f"spectrum_net config base_size must be (C, H, W), got {base_size}")
    if len(layers) != 2 or min(layers) <= 0:
        raise ValueError(
            f"spectrum_net config layers={layers} is not supported; SpectrumMLP has exactly two "
            "hidden layers (e.g. [64, 8])"
        )
    return {"base_size": base_size, "layers": layers}


# --------------------------------------------------------------------------------------------
# Parameter trees
# --------------------------------------------------------------------------------------------


def _abstract(build: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of a module whose arrays are ShapeDtypeStructs."""
    return nnx.split(nnx.eval_shape(build))


def _flat(state: nnx.State) -> dict[str, Any]:
    """Leaves of `state` keyed by dotted path."""
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    return {".".join(str(p) for p in path): v for path, v in flat.items()}


def _from_flat(build: Callable[[], nnx.Module], params: Mapping[str, Any], what: str) -> Any:
    """Build the module `build()` describes, holding `params` (flat dotted keys, float32)."""
    graphdef, state = _abstract(build)
    expected = _flat(state)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    bad = [
        f"{k} {tuple(np.shape(params[k]))}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in params and tuple(np.shape(params[k])) != tuple(v.shape)
    ]
    if missing or extra or bad:
        raise ValueError(
            f"{what} params do not match the config: missing {missing}, unexpected {extra}, "
            f"shape mismatches {bad}"
        )
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    new = {p: jnp.asarray(params[".".join(str(q) for q in p)], jnp.float32) for p in flat}
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(new))
    return nnx.merge(graphdef, state)


def abstract_gm_dit_params(config: GMDiTConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the `GMDiT` parameters for `config`, keyed by dotted path (nothing allocated)."""
    return _flat(_abstract(lambda: GMDiT(config, rngs=nnx.Rngs(0)))[1])


def gm_dit_from_params(config: GMDiTConfig, params: Mapping[str, Any]) -> GMDiT:
    """A `GMDiT` holding `params` (flat dotted keys in the layout of `config.scan_blocks`)."""
    return _from_flat(lambda: GMDiT(config, rngs=nnx.Rngs(0)), params, "GM-DiT")


def spectrum_from_params(
    base_size: tuple[int, ...] | list[int],
    layers: tuple[int, ...] | list[int],
    params: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
) -> SpectrumMLP:
    """A `SpectrumMLP` holding `params` (flat dotted keys: `linear_1.kernel`, ...)."""
    return _from_flat(
        lambda: SpectrumMLP(base_size, layers, dtype=dtype, rngs=nnx.Rngs(0)),
        params,
        "SpectrumMLP",
    )


def stack_blocks(params: Mapping[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """List layout `blocks.{i}.X` -> scan layout `blocks.X` stacked over i = 0..num_layers-1."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks.")}
    names = sorted({k.split(".", 2)[2] for k in params if k.startswith("blocks.0.")})
    for name in names:
        missing = [i for i in range(num_layers) if f"blocks.{i}.{name}" not in params]
        if missing:
            raise ValueError(f"params lack blocks.{{i}}.{name} for block indices {missing}")
        out[f"blocks.{name}"] = np.stack(
            [np.asarray(params[f"blocks.{i}.{name}"]) for i in range(num_layers)]
        )
    leftover = {k for k in params if k.startswith("blocks.")} - {
        f"blocks.{i}.{n}" for i in range(num_layers) for n in names
    }
    if leftover:
        raise ValueError(
            f"params have block entries outside 0..{num_layers - 1}: {sorted(leftover)}"
        )
    return out


def unstack_blocks(params: Mapping[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Scan layout `blocks.X` `[num_layers, ...]` -> list layout `blocks.{i}.X`."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks.")}
    for key, value in params.items():
        if not key.startswith("blocks."):
            continue
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != num_layers:
            raise ValueError(
                f"{key} has shape {value.shape}; the scan layout needs a leading axis {num_layers}"
            )
        name = key[len("blocks.") :]
        for i in range(num_layers):
            out[f"blocks.{i}.{name}"] = value[i]
    return out


def _list_layout_shapes(config: GMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the list-of-blocks layout (traced via the faster stacked layout)."""
    stacked = abstract_gm_dit_params(dataclasses.replace(config, scan_blocks=True))
    shapes = {}
    for key, value in stacked.items():
        if key.startswith("blocks."):
            for i in range(config.num_layers):
                shapes[f"blocks.{i}.{key[len('blocks.') :]}"] = tuple(value.shape[1:])
        else:
            shapes[key] = tuple(value.shape)
    return shapes


def _apply_transform(rule: KeyRule, value: np.ndarray) -> np.ndarray:
    """Apply a `KEY_TABLE` transform to an official array (shape errors surface later)."""
    if rule.transform == "copy":
        return value
    if rule.transform == "linear":
        return value.T if value.ndim == 2 else value
    if rule.transform == "patch":
        if value.ndim != 4:
            return value
        d, c, p, q = value.shape
        return value.transpose(2, 3, 1, 0).reshape(p * q * c, d)
    raise ValueError(f"transform {rule.transform!r} has no array output; allowed: {TRANSFORMS}")


def _expanded_rules(component: str, num_layers: int) -> list[tuple[str, str, KeyRule]]:
    """(official key, our key, rule) for every `KEY_TABLE` row of `component`, blocks expanded."""
    rows = []
    for rule in KEY_TABLE:
        if rule.component != component:
            continue
        indices = range(num_layers) if "{i}" in rule.official else (None,)
        for i in indices:
            official = rule.official.replace("{i}", str(i))
            ours = rule.ours.replace("{i}", str(i))
            rows.append((official, ours, rule))
    return rows


def expected_official_shapes(config: GMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The official transformer keys (required ones) and torch shapes implied by `config`."""
    ours = _list_layout_shapes(config)
    p, d, c = config.patch_size, config.hidden_size, config.in_channels
    shapes = {}
    for official, key, rule in _expanded_rules("transformer", config.num_layers):
        if rule.optional:
            continue
        shape = ours[key]
        if rule.transform == "linear":
            shape = shape[::-1]
        elif rule.transform == "patch":
            shape = (d, c, p, p)
        shapes[official] = shape
    return shapes


def _convert(
    state_dict: Mapping[str, np.ndarray],
    component: str,
    expected: Mapping[str, tuple[int, ...]],
    num_layers: int,
    check_fixed: Callable[[str, np.ndarray], str | None],
) -> dict[str, np.ndarray]:
    """Map an official state dict through the `component` rows of `KEY_TABLE` (list layout)."""
    rows = {
        official: (ours, rule) for official, ours, rule in _expanded_rules(component, num_layers)
    }
    out: dict[str, np.ndarray] = {}
    unmapped, shape_errors, fixed_errors = [], [], []
    for key in sorted(state_dict):
        if key not in rows:
            unmapped.append(key)
            continue
        ours, rule = rows[key]
        value = np.asarray(state_dict[key])
        if rule.transform == "fixed":
            problem = check_fixed(key, value)
            if problem:
                fixed_errors.append(problem)
            continue
        value = _apply_transform(rule, value)
        want = tuple(expected[ours])
        if tuple(value.shape) != want:
            shape_errors.append(
                f"{key} {tuple(np.shape(state_dict[key]))} -> {ours} {tuple(value.shape)}, "
                f"expected {want}"
            )
            continue
        out[ours] = np.ascontiguousarray(value.astype(np.float32))
    missing = sorted(
        official
        for official, (_, rule) in rows.items()
        if not rule.optional and official not in state_dict
    )
    problems = []
    for title, items in (
        ("unmapped keys (not in KEY_TABLE for this config)", unmapped),
        ("shape mismatches", shape_errors),
        ("fixed buffers that differ from ours", fixed_errors),
        ("missing keys", missing),
    ):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise ValueError(
            f"official {component} state dict does not match its config:\n" + "\n".join(problems)
        )
    return out


def convert_transformer_state_dict(
    state_dict: Mapping[str, np.ndarray], config: GMDiTConfig
) -> dict[str, np.ndarray]:
    """Official `transformer/` arrays -> our float32 `GMDiT` params (layout of `config.scan_blocks`).

    Raises ValueError listing every unmapped key, missing key and shape mismatch at once.
    """
    expected = _list_layout_shapes(config)

    def check_pos_embed(key: str, value: np.ndarray) -> str | None:
        ref = sincos_position_embedding_2d(config.grid_size, config.grid_size, config.hidden_size)
        value = np.asarray(value, np.float32).reshape(-1, config.hidden_size)
        if value.shape != ref.shape or not np.allclose(value, ref, atol=1e-4):
            return f"{key} {value.shape} is not the fixed 2-D sin-cos table {ref.shape}"
        return None

    params = _convert(state_dict, "transformer", expected, config.num_layers, check_pos_embed)
    if config.scan_blocks:
        params = stack_blocks(params, config.num_layers)
    return params


def convert_spectrum_state_dict(
    state_dict: Mapping[str, np.ndarray],
    base_size: tuple[int, ...] | list[int],
    layers: tuple[int, ...] | list[int],
) -> dict[str, np.ndarray]:
    """Official `spectrum_net/` arrays -> our float32 `SpectrumMLP` params."""
    abstract = _flat(_abstract(lambda: SpectrumMLP(base_size, layers, rngs=nnx.Rngs(0)))[1])
    expected = {k: tuple(v.shape) for k, v in abstract.items()}
    return _convert(state_dict, "spectrum_net", expected, 0, lambda key, value: None)


# --------------------------------------------------------------------------------------------
# Reading the official folder
# --------------------------------------------------------------------------------------------


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
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            tried.append(name)
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{folder!r} holds none of the weights files {tried}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All arrays of a safetensors file, or of every shard listed by a `.safetensors.index.json`."""
    if not path.endswith(".index.json"):
        return load_file(path)
    with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_file(os.path.join(os.path.dirname(path), shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{path!r} lists keys absent from its shards: {missing[:10]}")
    return out


def _read_json(path: str) -> dict[str, Any]:
    """A JSON file as a dict (FileNotFoundError naming the path when absent)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path) as f:
        return json.load(f)


def read_component(
    root: str, component: str, variant: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """(config dict, state dict, weights path) of `root/component` of an official folder."""
    folder = os.path.join(root, component)
    config = _read_json(os.path.join(folder, "config.json"))
    weights = find_weights_file(folder, variant)
    return config, read_safetensors(weights), weights


def is_official_folder(path: str) -> bool:
    """Whether `path` looks like a raw diffusers GM-DiT folder (`transformer/config.json`)."""
    return os.path.isfile(os.path.join(path, "transformer", "config.json"))


def is_converted_folder(path: str) -> bool:
    """Whether `path` holds a folder written by `convert_official_folder` (its manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


@dataclasses.dataclass
class OfficialModels:
    """The networks of an official GM-DiT pipeline, as Flax modules."""

    transformer: GMDiT
    spectrum_net: SpectrumMLP | None
    vae: AutoencoderKL | None


def _load_vae_diffusers(folder: str, variant: str | None, dtype: Any) -> AutoencoderKL:
    """Convert a diffusers `vae/` folder in memory."""
    config = VAEConfig.from_diffusers(_read_json(os.path.join(folder, "config.json")), dtype=dtype)
    state_dict = read_safetensors(find_weights_file(folder, variant))
    return vae_from_params(config, convert_diffusers_state_dict(state_dict, config))


def load_vae_folder(
    folder: str, *, variant: str | None = None, dtype: Any = "float32"
) -> AutoencoderKL:
    """A VAE from a converted folder (`vae_params.npz`) or a diffusers `vae/` folder."""
    if os.path.isfile(os.path.join(folder, VAE_PARAMS_NAME)):
        return load_vae(os.path.join(folder, VAE_PARAMS_NAME), dtype=dtype)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return _load_vae_diffusers(folder, variant, dtype)
    raise FileNotFoundError(
        f"VAE folder {folder!r} holds neither {VAE_PARAMS_NAME!r} (converted) nor config.json "
        "(diffusers)"
    )


def _load_raw(
    root: str, variant: str | None, scan_blocks: bool, dtype: Any, with_vae: bool
) -> OfficialModels:
    """Convert a raw official folder in memory."""
    config_dict, sd, _ = read_component(root, "transformer", variant)
    config = gm_dit_config_from_official(config_dict, scan_blocks=scan_blocks, dtype=dtype)
    transformer = gm_dit_from_params(config, convert_transformer_state_dict(sd, config))
    del sd
    spectrum = None
    if os.path.isdir(os.path.join(root, "spectrum_net")):
        spec_dict, spec_sd, _ = read_component(root, "spectrum_net", variant)
        spec_cfg = spectrum_config_from_official(spec_dict)
        params = convert_spectrum_state_dict(spec_sd, spec_cfg["base_size"], spec_cfg["layers"])
        spectrum = spectrum_from_params(
            spec_cfg["base_size"], spec_cfg["layers"], params, dtype=dtype
        )
    vae = None
    if with_vae and os.path.isdir(os.path.join(root, "vae")):
        vae = _load_vae_diffusers(os.path.join(root, "vae"), variant, dtype)
    return OfficialModels(transformer, spectrum, vae)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _load_converted(
    root: str, scan_blocks: bool | None, dtype: Any, with_vae: bool
) -> OfficialModels:
    """Load a folder written by `convert_official_folder`."""
    manifest = _read_json(os.path.join(root, MANIFEST_NAME))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root!r} has format_version={manifest.get('format_version')!r}; this code reads "
            f"version {FORMAT_VERSION}: convert the official folder again"
        )
    fields = _read_json(os.path.join(root, "transformer", GMDIT_CONFIG_NAME))
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
        spec_cfg = _read_json(os.path.join(spec_dir, SPECTRUM_CONFIG_NAME))
        spectrum = spectrum_from_params(
            spec_cfg["base_size"],
            spec_cfg["layers"],
            _load_npz(os.path.join(spec_dir, SPECTRUM_PARAMS_NAME)),
            dtype=dtype,
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
    the stored layout (the list layout for a raw folder). `dtype` is the compute dtype of all three
    networks (parameters stay float32).
    """
    if is_converted_folder(path):
        return _load_converted(path, scan_blocks, dtype, with_vae)
    if is_official_folder(path):
        return _load_raw(path, variant, bool(scan_blocks), dtype, with_vae)
    raise FileNotFoundError(
        f"{path!r} is neither a converted folder (no {MANIFEST_NAME}) nor an official diffusers "
        "GM-DiT folder (no transformer/config.json)"
    )


# --------------------------------------------------------------------------------------------
# Writing a converted folder
# --------------------------------------------------------------------------------------------


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
        vae_config = VAEConfig.from_diffusers(_read_json(os.path.join(vae_src, "config.json")))
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

"""The conversion tables of the official checkpoint: official key -> our parameter path.

Reference: `docs/official-checkpoint.md` (every official key and shape), `docs/math.md` §6.1 (GM-DiT),
§6.3 (SpectrumMLP), §4.8 (the VAE). Two tables, both here: `KEY_TABLE` (GM-DiT and SpectrumMLP,
one row per official key) and the VAE's rules by module name (`VAE_CONV_NAMES`, `VAE_NORM_NAMES`,
`VAE_LINEAR_NAMES`; section "The VAE" below). Every converter checks every key, every shape and
that every value is finite, and reports all problems at once in one ValueError.

`KEY_TABLE` lists, for every official key (with `{i}` the block index 0..L-1), our parameter path
(list-of-blocks layout) and the transform:

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
stacked in block order into `blocks.X` with a leading `[num_layers]` axis
(`gmflow_jax.models.flat_params.stack_blocks`).

==================================  ===========================================================
name                                what it is
==================================  ===========================================================
`KeyRule`, `KEY_TABLE`, `TRANSFORMS`  the table
`apply_transform`, `expanded_rules`   one row applied to an array; the rows with blocks expanded
`list_layout_shapes`                our GM-DiT parameter shapes (list layout)
`expected_official_shapes`          the official transformer keys and torch shapes of a config
`convert_state_dict`                official state dict -> our flat float32 params (one component)
`convert_transformer_state_dict`    official `transformer/` arrays -> `GMDiT` params
`convert_spectrum_state_dict`       official `spectrum_net/` arrays -> `SpectrumMLP` params
`map_vae_key`                       one diffusers VAE key and array -> our key and array
`convert_vae_state_dict`            diffusers `AutoencoderKL` arrays -> `AutoencoderKL` params
==================================  ===========================================================

The VAE (§4.8): parameter names mirror the diffusers module tree, so its table is by module name
(a key is `<module path>.<module name>.<weight|bias>`):

=============================================  ===========================  ===================================
diffusers module name (last component)         ours                         weight transform
=============================================  ===========================  ===================================
`conv_in`, `conv_out`, `conv1`, `conv2`,       same name, `weight` ->       OIHW `(out, in, kh, kw)` ->
`conv_shortcut`, `conv` (down/upsamplers),     `kernel`, `bias` -> `bias`   HWIO `(kh, kw, in, out)`
`quant_conv`, `post_quant_conv`
`norm1`, `norm2`, `conv_norm_out`,             same name, `weight` ->       none
`group_norm` (mid-block attention)             `scale`, `bias` -> `bias`
`to_q` or legacy `query`                       `to_q`, `weight` -> `kernel`  `(out, in)` -> `(in, out)`
`to_k` or legacy `key`                         `to_k`                        same
`to_v` or legacy `value`                       `to_v`                        same
`to_out.0` or legacy `proj_attn`               `to_out`                      same
=============================================  ===========================  ===================================

Linear weights stored as 1x1 convs `(out, in, 1, 1)` (as in the original LDM checkpoints) are
accepted too. The module path is kept as is (`encoder.down_blocks.{i}.resnets.{j}`,
`.downsamplers.0`, `decoder.up_blocks.{i}.upsamplers.0`, `{en,de}coder.mid_block.resnets.{0,1}`,
`.mid_block.attentions.0`), e.g. `encoder.mid_block.attentions.0.query.weight` ->
`encoder.mid_block.attentions.0.to_q.kernel`. Arrays are converted to float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from gmflow_jax.models.embeddings import sincos_position_embedding_2d
from gmflow_jax.models.flat_params import abstract_flat_params, stack_blocks
from gmflow_jax.models.gm_dit import GMDiT, GMDiTConfig
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.vae import VAEConfig, abstract_vae_params


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


def list_layout_shapes(config: GMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the list-of-blocks layout (traced via the faster stacked layout)."""
    stacked = abstract_flat_params(
        lambda: GMDiT(dataclasses.replace(config, scan_blocks=True), rngs=nnx.Rngs(0))
    )
    shapes = {}
    for key, value in stacked.items():
        if key.startswith("blocks."):
            for i in range(config.num_layers):
                shapes[f"blocks.{i}.{key[len('blocks.') :]}"] = tuple(value.shape[1:])
        else:
            shapes[key] = tuple(value.shape)
    return shapes


def apply_transform(rule: KeyRule, value: np.ndarray) -> np.ndarray:
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


def expanded_rules(component: str, num_layers: int) -> list[tuple[str, str, KeyRule]]:
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
    ours = list_layout_shapes(config)
    p, d, c = config.patch_size, config.hidden_size, config.in_channels
    shapes = {}
    for official, key, rule in expanded_rules("transformer", config.num_layers):
        if rule.optional:
            continue
        shape = ours[key]
        if rule.transform == "linear":
            shape = shape[::-1]
        elif rule.transform == "patch":
            shape = (d, c, p, p)
        shapes[official] = shape
    return shapes


def _non_finite_report(key: str, value: np.ndarray) -> str:
    """`key` and how many of its values are NaN / infinite."""
    return (
        f"{key}: {int(np.isnan(value).sum())} NaN and {int(np.isinf(value).sum())} infinite of "
        f"{value.size} values"
    )


def _raise_problems(title: str, groups: tuple[tuple[str, list[str]], ...]) -> None:
    """Raise one ValueError listing every non-empty (heading, items) group, if any."""
    problems = [
        f"{len(items)} {heading}:\n  " + "\n  ".join(items) for heading, items in groups if items
    ]
    if problems:
        raise ValueError(f"{title}:\n" + "\n".join(problems))


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    component: str,
    expected: Mapping[str, tuple[int, ...]],
    num_layers: int,
    check_fixed: Callable[[str, np.ndarray], str | None],
) -> dict[str, np.ndarray]:
    """Map an official state dict through the `component` rows of `KEY_TABLE` (list layout).

    Raises ValueError listing every unmapped, mis-shaped, non-finite and missing key at once.
    """
    rows = {
        official: (ours, rule) for official, ours, rule in expanded_rules(component, num_layers)
    }
    out: dict[str, np.ndarray] = {}
    unmapped, shape_errors, fixed_errors, non_finite = [], [], [], []
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
        value = apply_transform(rule, value)
        want = tuple(expected[ours])
        if tuple(value.shape) != want:
            shape_errors.append(
                f"{key} {tuple(np.shape(state_dict[key]))} -> {ours} {tuple(value.shape)}, "
                f"expected {want}"
            )
            continue
        value = np.ascontiguousarray(value.astype(np.float32))
        if not np.isfinite(value).all():
            non_finite.append(_non_finite_report(key, value))
            continue
        out[ours] = value
    missing = sorted(
        official
        for official, (_, rule) in rows.items()
        if not rule.optional and official not in state_dict
    )
    _raise_problems(
        f"official {component} state dict does not match its config",
        (
            ("unmapped keys (not in KEY_TABLE for this config)", unmapped),
            ("shape mismatches", shape_errors),
            ("fixed buffers that differ from ours", fixed_errors),
            ("arrays with non-finite values", non_finite),
            ("missing keys", missing),
        ),
    )
    return out


def convert_transformer_state_dict(
    state_dict: Mapping[str, np.ndarray], config: GMDiTConfig
) -> dict[str, np.ndarray]:
    """Official `transformer/` arrays -> our float32 `GMDiT` params (layout of `config.scan_blocks`).

    Raises ValueError listing every unmapped key, missing key and shape mismatch at once.
    """
    expected = list_layout_shapes(config)

    def check_pos_embed(key: str, value: np.ndarray) -> str | None:
        ref = sincos_position_embedding_2d(config.grid_size, config.grid_size, config.hidden_size)
        value = np.asarray(value, np.float32).reshape(-1, config.hidden_size)
        if value.shape != ref.shape or not np.allclose(value, ref, atol=1e-4):
            return f"{key} {value.shape} is not the fixed 2-D sin-cos table {ref.shape}"
        return None

    params = convert_state_dict(
        state_dict, "transformer", expected, config.num_layers, check_pos_embed
    )
    if config.scan_blocks:
        params = stack_blocks(params, config.num_layers)
    return params


def convert_spectrum_state_dict(
    state_dict: Mapping[str, np.ndarray],
    base_size: tuple[int, ...] | list[int],
    layers: tuple[int, ...] | list[int],
) -> dict[str, np.ndarray]:
    """Official `spectrum_net/` arrays -> our float32 `SpectrumMLP` params."""
    abstract = abstract_flat_params(lambda: SpectrumMLP(base_size, layers, rngs=nnx.Rngs(0)))
    expected = {k: tuple(v.shape) for k, v in abstract.items()}
    return convert_state_dict(state_dict, "spectrum_net", expected, 0, lambda key, value: None)


# --------------------------------------------------------------------------------------------
# The VAE (§4.8): rules by diffusers module name (module docstring)
# --------------------------------------------------------------------------------------------

VAE_CONV_NAMES = frozenset(
    {
        "conv_in",
        "conv_out",
        "conv1",
        "conv2",
        "conv_shortcut",
        "conv",
        "quant_conv",
        "post_quant_conv",
    }
)
"""Diffusers VAE conv module names: OIHW weight -> HWIO kernel."""

VAE_NORM_NAMES = frozenset({"norm1", "norm2", "conv_norm_out", "group_norm"})
"""Diffusers VAE GroupNorm module names: weight -> scale."""

VAE_LINEAR_NAMES = {
    "to_q": "to_q",
    "query": "to_q",
    "to_k": "to_k",
    "key": "to_k",
    "to_v": "to_v",
    "value": "to_v",
    "to_out.0": "to_out",
    "proj_attn": "to_out",
}
"""Diffusers VAE attention projection names (current and legacy) -> ours: `(out, in)` -> `(in, out)`."""


def map_vae_key(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    """One diffusers VAE key and array -> (our key, transformed array), or None if not in the table."""
    module, _, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias") or not module:
        return None
    if module.endswith(".to_out.0") or module == "to_out.0":
        parent, name = module[: -len("to_out.0")].rstrip("."), "to_out.0"
    else:
        parent, _, name = module.rpartition(".")
    prefix = f"{parent}." if parent else ""
    if name in VAE_CONV_NAMES:
        if leaf == "bias":
            return f"{prefix}{name}.bias", value
        if value.ndim != 4:
            return f"{prefix}{name}.kernel", value  # rank mismatch surfaces as a shape error
        return f"{prefix}{name}.kernel", np.transpose(value, (2, 3, 1, 0))
    if name in VAE_NORM_NAMES:
        return f"{prefix}{name}.{'scale' if leaf == 'weight' else 'bias'}", value
    if name in VAE_LINEAR_NAMES:
        ours = f"{prefix}{VAE_LINEAR_NAMES[name]}"
        if leaf == "bias":
            return f"{ours}.bias", value
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        return f"{ours}.kernel", value.T if value.ndim == 2 else value
    return None


def convert_vae_state_dict(
    state_dict: Mapping[str, Any], config: VAEConfig
) -> dict[str, np.ndarray]:
    """Map a diffusers AutoencoderKL state dict (NCHW / torch layout) to our float32 parameters.

    Raises ValueError listing every unmapped key, duplicate target (e.g. both `query` and `to_q`),
    missing parameter, shape mismatch and non-finite array at once.
    """
    expected = abstract_vae_params(config)
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}  # our key -> the diffusers key that claimed it
    unmapped, duplicates, unexpected, shape_errors, non_finite = [], [], [], [], []
    for key in sorted(state_dict):
        mapped = map_vae_key(key, np.asarray(state_dict[key]))
        if mapped is None:
            unmapped.append(key)
            continue
        ours, value = mapped
        if ours in source:
            duplicates.append(f"{key} and {source[ours]} -> {ours}")
            continue
        if ours not in expected:
            unexpected.append(f"{key} -> {ours}")
            continue
        source[ours] = key
        if tuple(value.shape) != tuple(expected[ours].shape):
            shape_errors.append(
                f"{key} {tuple(np.shape(state_dict[key]))} -> {ours} {tuple(value.shape)}, "
                f"expected {tuple(expected[ours].shape)}"
            )
            continue
        value = np.ascontiguousarray(value, dtype=np.float32)
        if not np.isfinite(value).all():
            non_finite.append(_non_finite_report(key, value))
            continue
        out[ours] = value
    missing = sorted(set(expected) - set(source))
    _raise_problems(
        "diffusers VAE state dict does not match the config",
        (
            ("unmapped keys (not in the conversion table)", unmapped),
            ("keys mapping to the same parameter", duplicates),
            ("keys mapping to parameters this config does not have", unexpected),
            ("shape mismatches", shape_errors),
            ("arrays with non-finite values", non_finite),
            ("missing parameters (no source key)", missing),
        ),
    )
    return out

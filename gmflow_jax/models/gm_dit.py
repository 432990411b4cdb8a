"""GM-DiT: the DiT backbone with a Gaussian-mixture head over the velocity u (`docs/math.md` §6.1).

Reference `docs/math.md`:

=======================================  ==========================================================
object                                   docs/math.md
=======================================  ==========================================================
`GMDiTConfig`, `gm_dit_config`           §6.1 table, §8.1 (DiT sizes S/B/L/XL, patch 2/4/8)
`GMDiT.trunk`: patch embed + positions   §6.1 steps 1-3 (embedding, conditioning, blocks)
`TimestepEmbedder`, label table          §6.1 step 2
`DiTBlock` (adaLN-Zero)                  §6.1 step 3
`GMDiT.head`: final layer, GM head       §6.1 steps 4-6
initialization                           §6.1 "Initialization (V1)"
=======================================  ==========================================================

Inputs: `x` `[B, H, W, C]` (H = W = `sample_size`), `t` `[B]` raw float time in [0, 1000], `y`
`[B]` int labels (`num_classes` is the null label). Output: a `gmflow_jax.gm.GM` over u with means
`[B, H, W, K, C]`, log-softmax log-weights `[B, H, W, K, 1]` and log-std `[B, 1, 1, 1, 1]`, all
float32; with `mean_only=True` (the flow-matching baseline) only the mean velocity `[B, H, W, C]`.

Precision: parameters are always float32. With `dtype=bfloat16` every Linear and the attention run
in bf16, while the residual stream, the LayerNorms, the adaLN modulation arithmetic, the
conditioning vector c and the time sinusoid stay float32 (as under PyTorch bf16 autocast); the
outputs are cast to float32.

Logical axis names (parameter metadata `out_sharding`, see `gmflow_jax.models.logical_axes`):

===============  ============================================================================
name             axis
===============  ============================================================================
"embed"          the hidden width D (residual stream, conditioning c)
"heads"          the concatenated q/k/v / attention-output width (num_heads x head_dim = D)
"mlp"            the block MLP hidden width 4D
"modulation"     adaLN modulation outputs (6D per block, 2D in the final layer)
"classes"        rows of the label table (num_classes + 1)
"patch"          the flattened input patch p*p*C
"freq"           the 256-d timestep sinusoid
"cond"           the hidden width D of the timestep MLP (between its two linears)
"head_out"       the final projection's per-token outputs p*p*G
"logstd_mlp"     the hidden width of the log-std head (logstd_inner_dim)
"logstd_out"     the single log-std output
"layers"         the stacked block axis (only with `scan_blocks=True`)
===============  ============================================================================

Activations are constrained (only under a mesh with rules, `models.logical_axes.constrain`) over
"batch" everywhere, so with the batch over data x fsdp no activation is ever summed across devices
and the only collectives of a step are parameter all-gathers and gradient reductions:
`("batch", "length", "embed")` for the residual stream, `("batch", "length", "mlp")` for the MLP
hidden layer, `("batch", "freq" | "cond" | "embed")` for the conditioning path (the time MLP, c and
SiLU(c)), `("batch", "modulation")` for every adaLN modulation, `("batch", "length", "head_out")`
and `("batch", None, None, None)` for the head's projection and its unpatchified output, and
`("batch", "logstd_mlp" | "logstd_out")` for the log-std head.

Weights are used in the compute dtype: every linear casts its float32 parameters to `dtype` before
the product (flax's `promote_dtype`), an elementwise op on the parameter's shard, so under FSDP the
parameter all-gathers move bf16 (checked on the TPU compiler by `python -m gmflow_jax.aot`).

Rematerialization (`remat`, `remat_policy`; `REMAT_POLICIES`): "full" recomputes the whole block in
the backward pass, "save_linear_inputs" keeps its linears' bf16 inputs, "none" (or `remat=False`)
keeps everything.

Parameter names and conversion from the official diffusers checkpoint
(`docs/official-checkpoint.md`): a torch Linear weight `(out, in)` becomes `kernel = weight.T`,
biases are copied.

==========================================  =================================================
this module                                 official key
==========================================  =================================================
`patch_embed.kernel` `[p*p*C, D]`           `pos_embed.proj.weight` W `(D, C, p, p)`:
                                            `kernel = W.transpose(2, 3, 1, 0).reshape(p*p*C, D)`
                                            (patch vector index `(a*p + b)*C + c`)
`time_embed.linear_1`, `.linear_2`          `emb.timestep_embedder.linear_1`, `.linear_2`
`label_embed.embedding` `[1001, D]`         `emb.class_embedder.embedding_table.weight` (as is)
`blocks[i].adaln_modulation`                `transformer_blocks.{i}.norm1.linear`
`blocks[i].attn_q`, `_k`, `_v`, `attn_out`  `transformer_blocks.{i}.attn1.to_q/to_k/to_v/to_out.0`
`blocks[i].mlp_in`, `.mlp_out`              `transformer_blocks.{i}.ff.net.0.proj`, `ff.net.2`
`final_modulation`                          `proj_out_1`
`final_proj`                                `proj_out_2` (same output order; §6.1 step 5)
`logstd_hidden`, `logstd_out`               `gm_out.logstd_layers.1`, `gm_out.logstd_layers.3`
==========================================  =================================================

With `scan_blocks=True`, `blocks` is one `DiTBlock` whose parameters are stacked along a leading
`[num_layers]` axis (stack the per-block arrays in order i = 0..L-1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gmflow_jax.gm import GM
from gmflow_jax.models.attention import self_attention
from gmflow_jax.models.embeddings import sincos_position_embedding_2d, timestep_embedding
from gmflow_jax.models.logical_axes import constrain, logical_param

Array = jax.Array

ATTN_NORM_EPS = 1e-6
"""LayerNorm eps before attention in every block (§6.1 step 3)."""

MLP_NORM_EPS = 1e-5
"""LayerNorm eps before the MLP in every block (§6.1 step 3; differs from the attention norm)."""

FINAL_NORM_EPS = 1e-6
"""LayerNorm eps of the final layer (§6.1 step 4)."""

TIME_FREQ_DIM = 256
"""Width of the timestep sinusoid (§6.1 step 2)."""

LABEL_TABLE_STD = 0.02
"""Std of the normal init of the label table (§6.1 init)."""

DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"""DiT model sizes: name -> (num_layers, hidden_size, num_heads)."""

LOGICAL_AXIS_NAMES = (
    "batch",
    "length",
    "embed",
    "heads",
    "mlp",
    "modulation",
    "classes",
    "patch",
    "freq",
    "cond",
    "head_out",
    "logstd_mlp",
    "logstd_out",
    "layers",
)
"""Every logical axis name used by GM-DiT parameters and activation constraints (see module doc)."""

LINEAR_INPUT_NAMES = ("attn_in", "attn_context", "mlp_in", "mlp_hidden")
"""`jax.ad_checkpoint.checkpoint_name` tags of the compute-dtype inputs of a block's linears: the
modulated LayerNorm output into q/k/v, the attention context into the output projection, the
modulated LayerNorm output into the MLP, the GELU output into the MLP's second linear."""

REMAT_POLICIES = {
    "none": None,
    "full": None,
    "save_linear_inputs": jax.checkpoint_policies.save_only_these_names(*LINEAR_INPUT_NAMES),
}
"""What each block keeps for the backward pass (`GMDiTConfig.remat_policy`, used when `remat`):

* "none": no rematerialization: every intermediate the backward pass needs is kept (attention
  probabilities, q/k/v, the 4D-wide MLP activations): fastest, most memory;
* "full": `nnx.remat` of the whole block with nothing saved inside it: only the block's float32
  input (the scan carry) is kept and the block's forward is recomputed in the backward pass
  (least memory; the behaviour of `remat=True` before the policy existed);
* "save_linear_inputs": the block is rematerialized but its linears' compute-dtype (bf16) inputs
  (`LINEAR_INPUT_NAMES`) are saved, so the backward pass recomputes the LayerNorms, q/k/v, the
  attention and the MLP's first linear, but not the two output projections, whose weight
  gradients read the saved inputs directly (memory between the two).

The policy changes memory and recomputation only, never the function or its gradients."""

_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class GMDiTConfig:
    """Sizes and options of a GM-DiT; defaults are the official XL/2, K = 8 ImageNet-256 model."""

    num_layers: int = 28  # number of adaLN-Zero blocks
    hidden_size: int = 1152  # D
    num_heads: int = 16  # attention heads (head_dim = D / num_heads)
    patch_size: int = 2  # p (kernel = stride of the patch embedding)
    in_channels: int = 4  # C (latent channels)
    sample_size: int = 32  # H = W of the input latent
    num_gaussians: int = 8  # K (must be 1 when mean_only)
    num_classes: int = 1000  # label classes; index num_classes is the null label
    logstd_inner_dim: int = 1024  # hidden width of the log-std head
    mlp_ratio: int = 4  # block MLP hidden = mlp_ratio * D
    mean_only: bool = False  # flow-matching baseline: output the mean velocity only
    dtype: Any = "float32"  # compute dtype (params are always float32)
    remat: bool = False  # rematerialize each block in the backward pass (nnx.remat)
    remat_policy: str = "full"  # what a rematerialized block saves (REMAT_POLICIES); remat only
    scan_blocks: bool = False  # stack blocks (nnx.vmap) and run them with nnx.scan

    def __post_init__(self) -> None:
        """Validate the sizes and the dtype."""
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "patch_size",
            "in_channels",
            "sample_size",
            "num_gaussians",
            "num_classes",
            "logstd_inner_dim",
            "mlp_ratio",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GMDiTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"GMDiTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.hidden_size % 4 != 0:
            raise ValueError(
                f"GMDiTConfig.hidden_size must be a multiple of 4 (2-D sin-cos positions), "
                f"got {self.hidden_size}"
            )
        if self.sample_size % self.patch_size != 0:
            raise ValueError(
                f"GMDiTConfig.sample_size ({self.sample_size}) must be divisible by "
                f"patch_size ({self.patch_size})"
            )
        if self.mean_only and self.num_gaussians != 1:
            raise ValueError(
                f"GMDiTConfig.num_gaussians must be 1 when mean_only=True, got {self.num_gaussians}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"GMDiTConfig.remat_policy must be one of {tuple(REMAT_POLICIES)}, "
                f"got {self.remat_policy!r}"
            )
        if jnp.dtype(self.dtype).name not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"GMDiTConfig.dtype must be one of {_SUPPORTED_DTYPES}, got {self.dtype!r}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The compute dtype as a numpy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def effective_remat_policy(self) -> str:
        """The policy the blocks run with: `remat_policy` when `remat`, else "none"."""
        return self.remat_policy if self.remat else "none"

    @property
    def grid_size(self) -> int:
        """Tokens per side, sample_size / patch_size."""
        return self.sample_size // self.patch_size

    @property
    def head_channels(self) -> int:
        """Output channels per pixel G: K(C+1) for the GM head, C when mean_only."""
        if self.mean_only:
            return self.in_channels
        return self.num_gaussians * (self.in_channels + 1)


def gm_dit_config(name: str, **overrides: Any) -> GMDiTConfig:
    """Config of a named DiT size "S/2" ... "XL/8" (optional prefix "DiT-") with field overrides.

    With `mean_only=True` and no explicit `num_gaussians`, `num_gaussians` is set to 1.
    """
    key = name[4:] if name.startswith("DiT-") else name
    size, _, patch = key.partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        allowed = [f"{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8)]
        raise ValueError(f"name must be one of {allowed}, got {name!r}")
    num_layers, hidden_size, num_heads = DIT_SIZES[size]
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        patch_size=int(patch),
    )
    if overrides.get("mean_only", False) and "num_gaussians" not in overrides:
        fields["num_gaussians"] = 1
    fields.update(overrides)
    return GMDiTConfig(**fields)


def _linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
    *,
    zero: bool = False,
) -> nnx.Linear:
    """Linear: float32 params, `dtype` compute, xavier or zero kernel, zero bias, logical names."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=logical_param(_zeros if zero else _xavier, names),
        bias_init=logical_param(_zeros, (names[1],)),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation x (1 + scale) + shift, per sample, in float32."""
    shift = shift.astype(jnp.float32)[:, None, :]
    scale = scale.astype(jnp.float32)[:, None, :]
    return x * (1.0 + scale) + shift


class TimestepEmbedder(nnx.Module):
    """Time conditioning: float32 256-d sinusoid of t, cast to `dtype`, Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        """Build the two linears (256 -> D -> D), xavier init."""
        self.dtype = jnp.dtype(dtype)
        self.linear_1 = _linear(TIME_FREQ_DIM, hidden_size, ("freq", "cond"), self.dtype, rngs)
        self.linear_2 = _linear(hidden_size, hidden_size, ("cond", "embed"), self.dtype, rngs)

    def __call__(self, t: Array) -> Array:
        """Embed raw times `t` `[B]` in [0, 1000] to `[B, D]` (in `dtype`)."""
        freq = timestep_embedding(t, TIME_FREQ_DIM, downscale_freq_shift=0.0)
        freq = constrain(freq.astype(self.dtype), ("batch", "freq"))
        h = constrain(self.linear_1(freq), ("batch", "cond"))
        return constrain(self.linear_2(jax.nn.silu(h)), ("batch", "embed"))


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block (§6.1 step 3): attention and tanh-GELU MLP, both gated by c."""

    def __init__(self, config: GMDiTConfig, *, rngs: nnx.Rngs):
        """Build the block: zero modulation linear, xavier q/k/v/out and MLP linears."""
        d = config.hidden_size
        dt = config.compute_dtype
        self.num_heads = config.num_heads
        self.dtype = dt
        self.adaln_modulation = _linear(d, 6 * d, ("embed", "modulation"), dt, rngs, zero=True)
        self.attn_q = _linear(d, d, ("embed", "heads"), dt, rngs)
        self.attn_k = _linear(d, d, ("embed", "heads"), dt, rngs)
        self.attn_v = _linear(d, d, ("embed", "heads"), dt, rngs)
        self.attn_out = _linear(d, d, ("heads", "embed"), dt, rngs)
        self.mlp_in = _linear(d, config.mlp_ratio * d, ("embed", "mlp"), dt, rngs)
        self.mlp_out = _linear(config.mlp_ratio * d, d, ("mlp", "embed"), dt, rngs)

    def _attention(self, x: Array) -> Array:
        """Multi-head self-attention with scale 1/sqrt(head_dim); x `[B, N, D]`."""
        b, n, d = x.shape
        hd = d // self.num_heads
        # Why the explicit casts: they are the casts the linears would do anyway (bit-identical),
        # made visible so a remat policy can save these compute-dtype tensors by name.
        x = checkpoint_name(x.astype(self.dtype), "attn_in")
        q = self.attn_q(x).reshape(b, n, self.num_heads, hd)
        k = self.attn_k(x).reshape(b, n, self.num_heads, hd)
        v = self.attn_v(x).reshape(b, n, self.num_heads, hd)
        o = self_attention(q, k, v)  # cuDNN fused attention where it applies (models/attention.py)
        o = checkpoint_name(o.reshape(b, n, d).astype(self.dtype), "attn_context")
        return self.attn_out(o)

    def _mlp(self, x: Array) -> Array:
        """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D)."""
        x = checkpoint_name(x.astype(self.dtype), "mlp_in")
        h = jax.nn.gelu(self.mlp_in(x), approximate=True)
        h = constrain(h, ("batch", "length", "mlp"))
        return self.mlp_out(checkpoint_name(h.astype(self.dtype), "mlp_hidden"))

    def __call__(self, h: Array, silu_c: Array) -> Array:
        """Update the float32 residual stream `h` `[B, N, D]` given SiLU(c) `[B, D]`."""
        # Why constrained: with SiLU(c) and the modulation split over the batch like the tokens, the
        # (fsdp-sharded) modulation weight is gathered; left to propagation, XLA contracts over its
        # sharded width instead and all-reduces the [B, 6D] modulation of the whole batch.
        mod = constrain(self.adaln_modulation(silu_c), ("batch", "modulation"))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        x = _modulate(_layer_norm(h, ATTN_NORM_EPS), shift1, scale1)
        h = h + (gate1[:, None, :] * self._attention(x)).astype(jnp.float32)
        x = _modulate(_layer_norm(h, MLP_NORM_EPS), shift2, scale2)
        h = h + (gate2[:, None, :] * self._mlp(x)).astype(jnp.float32)
        return constrain(h, ("batch", "length", "embed"))


def _apply_block(block: DiTBlock, h: Array, silu_c: Array) -> Array:
    """Call one block (a function so it can be wrapped by nnx.remat / nnx.scan)."""
    return block(h, silu_c)


class GMDiT(nnx.Module):
    """GM-DiT (§6.1): `(x [B,H,W,C], t [B], y [B]) -> GM` over u (mean velocity if mean_only)."""

    def __init__(self, config: GMDiTConfig, *, rngs: nnx.Rngs):
        """Build all layers with the §6.1 initialization (params float32)."""
        self.config = config
        cfg = config
        d = cfg.hidden_size
        dt = cfg.compute_dtype
        p = cfg.patch_size
        patch_dim = p * p * cfg.in_channels
        self.patch_embed = _linear(patch_dim, d, ("patch", "embed"), dt, rngs)
        self.time_embed = TimestepEmbedder(d, dtype=dt, rngs=rngs)
        self.label_embed = nnx.Embed(
            cfg.num_classes + 1,
            d,
            embedding_init=logical_param(
                nnx.initializers.normal(LABEL_TABLE_STD), ("classes", "embed")
            ),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        if cfg.scan_blocks:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(block_rngs: nnx.Rngs) -> DiTBlock:
                return DiTBlock(cfg, rngs=block_rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_modulation = _linear(d, 2 * d, ("embed", "modulation"), dt, rngs, zero=True)
        self.final_proj = _linear(d, p * p * cfg.head_channels, ("embed", "head_out"), dt, rngs)
        if not cfg.mean_only:
            self.logstd_hidden = _linear(d, cfg.logstd_inner_dim, ("embed", "logstd_mlp"), dt, rngs)
            self.logstd_out = _linear(
                cfg.logstd_inner_dim, 1, ("logstd_mlp", "logstd_out"), dt, rngs, zero=True
            )

    def _check_inputs(self, x: Array, t: Array, y: Array) -> None:
        """Raise ValueError on shapes or dtypes that do not match the config."""
        cfg = self.config
        want = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, want))}], got {x.shape}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B] = ({b},), got {t.shape}")
        if y.shape != (b,):
            raise ValueError(f"y must have shape [B] = ({b},), got {y.shape}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y must be integer labels in [0, {cfg.num_classes}], got {y.dtype}")

    def _patchify(self, x: Array) -> Array:
        """`[B, H, W, C]` -> `[B, N, p*p*C]`, tokens row-major, patch index (a*p + b)*C + c."""
        cfg = self.config
        b, p, g = x.shape[0], cfg.patch_size, cfg.grid_size
        x = x.reshape(b, g, p, g, p, cfg.in_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, p * p * cfg.in_channels)

    def _unpatchify(self, o: Array) -> Array:
        """`[B, N, p*p*G]` -> `[B, H, W, G]`; token (i,j) output (ap+b)G+g is pixel (ip+a, jp+b)."""
        cfg = self.config
        b, p, g = o.shape[0], cfg.patch_size, cfg.grid_size
        o = o.reshape(b, g, g, p, p, cfg.head_channels).transpose(0, 1, 3, 2, 4, 5)
        return o.reshape(b, g * p, g * p, cfg.head_channels)

    def _run_blocks(self, h: Array, silu_c: Array) -> Array:
        """Apply the blocks: a Python loop or nnx.scan over the stacked blocks, each rematerialized
        by `cfg.effective_remat_policy` (`REMAT_POLICIES`)."""
        cfg = self.config
        policy = cfg.effective_remat_policy
        if policy == "none":
            block_fn = _apply_block
        elif policy == "full":
            block_fn = nnx.remat(_apply_block)  # no policy argument: exactly remat=True as before
        else:
            block_fn = nnx.remat(_apply_block, policy=REMAT_POLICIES[policy])
        if cfg.scan_blocks:

            @nnx.scan(
                in_axes=(0, nnx.Carry, None),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def scan_blocks(block: DiTBlock, h: Array, silu_c: Array) -> Array:
                return block_fn(block, h, silu_c)

            return scan_blocks(self.blocks, h, silu_c)
        for block in self.blocks:
            h = block_fn(block, h, silu_c)
        return h

    def trunk(self, x: Array, t: Array, y: Array) -> tuple[Array, Array]:
        """Patch embedding, positions, conditioning and the blocks (§6.1).

        Returns the token states h `[B, N, D]` and the conditioning embedding c `[B, D]`
        (timestep + label), both float32.
        """
        x, t, y = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
        self._check_inputs(x, t, y)
        cfg = self.config
        dt = cfg.compute_dtype
        pos = sincos_position_embedding_2d(cfg.grid_size, cfg.grid_size, cfg.hidden_size)
        h = self.patch_embed(self._patchify(x.astype(dt))).astype(jnp.float32) + pos[None]
        h = constrain(h, ("batch", "length", "embed"))
        # Why the conditioning path is constrained: c feeds every block's modulation; split over the
        # batch like the tokens, its linears gather their weights instead of all-reducing [B, D].
        c = self.time_embed(t).astype(jnp.float32) + self.label_embed(y).astype(jnp.float32)
        c = constrain(c, ("batch", "embed"))
        return self._run_blocks(h, constrain(jax.nn.silu(c), ("batch", "embed"))), c

    def head(self, h: Array, c: Array) -> GM | Array:
        """The final adaLN layer and the GM head (§6.1 steps 4-6): tokens `[B, N, D]` -> GM over u.

        Means `[B,H,W,K,C]`, log-softmax log-weights `[B,H,W,K,1]`, and one log-std per sample
        `[B,1,1,1,1]` from the log-std MLP on the stop-gradient conditioning, all float32; the mean
        velocity `[B,H,W,C]` when mean_only.
        """
        cfg = self.config
        b = h.shape[0]
        mod = constrain(self.final_modulation(jax.nn.silu(c)), ("batch", "modulation"))
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = _modulate(_layer_norm(h, FINAL_NORM_EPS), shift, scale)
        o = constrain(self.final_proj(h), ("batch", "length", "head_out"))
        o = constrain(self._unpatchify(o.astype(jnp.float32)), ("batch", None, None, None))
        if cfg.mean_only:
            return o

        k, ch = cfg.num_gaussians, cfg.in_channels
        spatial = o.shape[1:3]
        means = o[..., : k * ch].reshape(b, *spatial, k, ch)
        logits = o[..., k * ch :].reshape(b, *spatial, k, 1)
        logweights = jax.nn.log_softmax(logits, axis=-2)
        logstd_in = jax.nn.silu(jax.lax.stop_gradient(c))
        hidden = constrain(self.logstd_hidden(logstd_in), ("batch", "logstd_mlp"))
        lam = constrain(self.logstd_out(jax.nn.silu(hidden)), ("batch", "logstd_out"))
        logstds = lam.astype(jnp.float32).reshape(b, 1, 1, 1, 1)
        return GM(means=means, logweights=logweights, logstds=logstds)

    def __call__(self, x: Array, t: Array, y: Array) -> GM | Array:
        """GM over u: means `[B,H,W,K,C]`, logweights `[B,H,W,K,1]`, logstds `[B,1,1,1,1]`, float32.

        With `mean_only=True`, returns the mean velocity `[B, H, W, C]` float32 instead.
        """
        return self.head(*self.trunk(x, t, y))

"""The official diffusers folder layout, described plainly (independent of the converter's table).

Shared by tests/unit/test_official_checkpoint.py, tests/unit/test_vae.py,
tests/integration/test_pipeline.py and tests/integration/test_sample_tool.py: the tiny and XL GM-DiT /
SpectrumMLP configs of `docs/official-checkpoint.md`, every official key and torch shape of a
`transformer/`, `spectrum_net/` and `vae/` state dict, random weights for them, and writers of
official-layout folders (config.json + safetensors per component).
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import numpy as np
from safetensors.numpy import save_file

REPO = pathlib.Path(__file__).resolve().parents[2]
"""The repository root."""

TINY_DIT_CONFIG = {
    "_class_name": "_GMDiTTransformer2DModel",
    "_diffusers_version": "0.32.2",
    "num_gaussians": 2,
    "constant_logstd": None,
    "logstd_inner_dim": 32,
    "gm_num_logstd_layers": 2,
    "class_dropout_prob": 0.0,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 8,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 12,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

TINY_SPECTRUM_CONFIG = {"_class_name": "_SpectrumMLP", "base_size": [4, 8, 8], "layers": [16, 8]}

# The official ImageNet checkpoint's configs (`docs/official-checkpoint.md`).
XL_DIT_CONFIG = {
    **TINY_DIT_CONFIG,
    "num_gaussians": 8,
    "logstd_inner_dim": 1024,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "num_layers": 28,
    "sample_size": 32,
    "num_embeds_ada_norm": 1000,
}
XL_SPECTRUM_CONFIG = {"base_size": [4, 32, 32], "layers": [64, 8]}


# ----------------------------------------------------------------------------------------------
# The official layout, from a plain description
# ----------------------------------------------------------------------------------------------


def official_transformer_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the official `transformer/` state dict -> torch shape (Linear: (out, in))."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    c, p, k = cfg["in_channels"], cfg["patch_size"], cfg["num_gaussians"]
    shapes = {}

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    shapes["pos_embed.proj.weight"] = (d, c, p, p)
    shapes["pos_embed.proj.bias"] = (d,)
    linear("emb.timestep_embedder.linear_1", 256, d)
    linear("emb.timestep_embedder.linear_2", d, d)
    shapes["emb.class_embedder.embedding_table.weight"] = (cfg["num_embeds_ada_norm"] + 1, d)
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}"
        linear(f"{b}.norm1.linear", d, 6 * d)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(f"{b}.attn1.{proj}", d, d)
        linear(f"{b}.ff.net.0.proj", d, 4 * d)
        linear(f"{b}.ff.net.2", 4 * d, d)
    linear("proj_out_1", d, 2 * d)
    linear("proj_out_2", d, p * p * k * (c + 1))
    linear("gm_out.logstd_layers.1", d, cfg["logstd_inner_dim"])
    linear("gm_out.logstd_layers.3", cfg["logstd_inner_dim"], 1)
    return shapes


def official_spectrum_layout(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the official `spectrum_net/` state dict -> torch shape."""
    n1, n2 = cfg["layers"]
    out = math.prod(cfg["base_size"])
    return {
        "mlp.0.weight": (n1, 2),
        "mlp.0.bias": (n1,),
        "mlp.2.weight": (n2, n1),
        "mlp.2.bias": (n2,),
        "mlp.4.weight": (out, n2),
        "mlp.4.bias": (out,),
    }


def random_state_dict(
    shapes: dict, seed: int, *, bias_std: float = 0.1, norm_std: float | None = None
) -> dict[str, np.ndarray]:
    """Random float32 weights, every one nonzero: fan-in scaled matrices, `bias_std` biases.

    With `norm_std`, GroupNorm scales (VAE keys `.norm*`, `group_norm`, `conv_norm_out`) are
    `1 + norm_std * N(0, 1)` rather than fan-in scaled, so activations keep their scale.
    """
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        is_norm = ".norm" in key or "group_norm" in key or "conv_norm_out" in key
        if key.endswith(".bias"):
            value = bias_std * rng.standard_normal(shape)
        elif norm_std is not None and is_norm:
            value = 1.0 + norm_std * rng.standard_normal(shape)
        elif key.endswith("embedding_table.weight"):
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        sd[key] = value.astype(np.float32)
    return sd


def write_official_folder(
    root: pathlib.Path, dit_sd: dict, spec_sd: dict | None, variant=None
) -> None:
    """A diffusers-style pipeline folder: transformer/ and spectrum_net/ (config + safetensors)."""
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    parts = [("transformer", TINY_DIT_CONFIG, dit_sd)]
    if spec_sd is not None:
        parts.append(("spectrum_net", TINY_SPECTRUM_CONFIG, spec_sd))
    for folder, cfg, sd in parts:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(cfg))
        save_file(sd, str(root / folder / name))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GMDiTPipeline"}))


def _load_tool(name: str):
    """Import tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_convert_cli():
    """Import tools/convert_official_checkpoint.py as a module."""
    return _load_tool("convert_official_checkpoint")


def load_convert_vae_cli():
    """Import tools/convert_vae.py as a module."""
    return _load_tool("convert_vae")


TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0",
    "act_fn": "silu",
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

PIPELINE_DIT_CONFIG = {**TINY_DIT_CONFIG, "num_embeds_ada_norm": 1000}

PIPELINE_VAE_CONFIG = {**TINY_VAE_CONFIG, "block_out_channels": [16, 32]}
"""`TINY_VAE_CONFIG` at half the width (the pipeline tests only need its key layout)."""


VAE_ATTENTION_NAMES = {
    "modern": ("to_q", "to_k", "to_v", "to_out.0"),
    "legacy": ("query", "key", "value", "proj_attn"),
}
"""The mid-block attention projections (q, k, v, out) as diffusers names them: `modern` since
diffusers 0.15, `legacy` in older checkpoints such as sd-vae-ft-ema."""


def vae_layout(
    cfg: dict, attention: str = "modern", attn_as_conv: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every key of a diffusers AutoencoderKL state dict -> torch shape (a plain description).

    `attention` picks the attention key naming of `VAE_ATTENTION_NAMES`; `attn_as_conv` gives the
    attention projections 1x1-conv weights `(c, c, 1, 1)`, as some legacy checkpoints store them.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    chans, lat = cfg["block_out_channels"], cfg["latent_channels"]

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c)
        norm(f"{name}.attentions.0.group_norm", c)
        for proj in VAE_ATTENTION_NAMES[attention]:
            shapes[f"{name}.attentions.0.{proj}.weight"] = (c, c, 1, 1) if attn_as_conv else (c, c)
            shapes[f"{name}.attentions.0.{proj}.bias"] = (c,)
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", cfg["in_channels"], chans[0], 3)
    for i, c in enumerate(chans):
        for j in range(cfg["layers_per_block"]):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", chans[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(chans) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder.mid_block", chans[-1])
    norm("encoder.conv_norm_out", chans[-1])
    conv("encoder.conv_out", chans[-1], 2 * lat, 3)
    conv("quant_conv", 2 * lat, 2 * lat, 1)
    conv("post_quant_conv", lat, lat, 1)
    rev = chans[::-1]
    conv("decoder.conv_in", lat, rev[0], 3)
    mid("decoder.mid_block", rev[0])
    for i, c in enumerate(rev):
        for j in range(cfg["layers_per_block"] + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", rev[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    norm("decoder.conv_norm_out", rev[-1])
    conv("decoder.conv_out", rev[-1], cfg["out_channels"], 3)
    return shapes


def vae_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Random weights of the `PIPELINE_VAE_CONFIG` VAE: GroupNorm scales near 1, small biases."""
    return random_state_dict(vae_layout(PIPELINE_VAE_CONFIG), seed, bias_std=0.05, norm_std=0.1)


def write_tiny_official_folder(root: pathlib.Path) -> pathlib.Path:
    """A tiny official diffusers folder: transformer/, spectrum_net/, vae/, model_index.json."""
    parts = {
        "transformer": (
            PIPELINE_DIT_CONFIG,
            random_state_dict(official_transformer_layout(PIPELINE_DIT_CONFIG), 1),
        ),
        "spectrum_net": (
            TINY_SPECTRUM_CONFIG,
            random_state_dict(official_spectrum_layout(TINY_SPECTRUM_CONFIG), 2),
        ),
        "vae": (PIPELINE_VAE_CONFIG, vae_state_dict(3)),
    }
    for folder, (cfg, sd) in parts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(cfg))
        save_file(sd, str(root / folder / "diffusion_pytorch_model.safetensors"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GMDiTPipeline"}))
    return root

"""Tests of the official GM-DiT checkpoint import (gmflow_jax.interop, tools/convert_official_checkpoint.py).

The official key names and shapes come from `official_transformer_layout` /
`official_spectrum_layout` (tests/helpers/official_layout.py), a plain description of the diffusers
layout (`docs/official-checkpoint.md`) written independently of the converter's table. The oracle
is a float64 NumPy forward pass of the official networks, channel-first like the reference, reading
the official-key dict directly (`docs/math.md` §6.1, §6.3).
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers.official_layout import (
    TINY_DIT_CONFIG,
    TINY_SPECTRUM_CONFIG,
    XL_DIT_CONFIG,
    XL_SPECTRUM_CONFIG,
    load_convert_cli,
    official_spectrum_layout,
    official_transformer_layout,
    random_state_dict,
    write_official_folder,
)

from gmflow_jax.interop import converted_folder, key_table, official_config
from gmflow_jax.models.builder import spectrum_from_params

# ----------------------------------------------------------------------------------------------
# NumPy float64 oracle (channel-first, official keys)
# ----------------------------------------------------------------------------------------------


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


class _OfficialGMDiT:
    """The reference GM-DiT forward (diffusers DiT + GM head) in float64 NumPy, NCHW in and out."""

    def __init__(self, sd: dict, cfg: dict):
        self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
        self.cfg = cfg
        self.heads = cfg["num_attention_heads"]
        self.d = cfg["num_attention_heads"] * cfg["attention_head_dim"]

    def linear(self, name, x):
        return x @ self.sd[f"{name}.weight"].T + self.sd[f"{name}.bias"]

    def pos_embed(self, gh, gw):
        """[N, D]: token (i, j) -> [sin(j w), cos(j w), sin(i w), cos(i w)], w_q = 1e4^(-q/(D/4))."""
        q = self.d // 4
        omega = 1.0 / 10000.0 ** (np.arange(q) / q)
        out = np.zeros((gh * gw, self.d))
        for i in range(gh):
            for j in range(gw):
                out[i * gw + j] = np.concatenate(
                    [np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
                )
        return out

    def attention(self, name, x):
        b, n, d = x.shape
        hd = d // self.heads

        def split(t):
            return t.reshape(b, n, self.heads, hd).transpose(0, 2, 1, 3)

        q, k, v = (split(self.linear(f"{name}.{p}", x)) for p in ("to_q", "to_k", "to_v"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        return self.linear(f"{name}.to_out.0", o)

    def __call__(self, x, t, y):
        """x [B, C, H, W], t [B] float, y [B] int -> (means [B,K,C,H,W], logweights [B,K,1,H,W], logstds [B,1,1,1,1])."""
        cfg, sd = self.cfg, self.sd
        x = np.asarray(x, np.float64)
        bsz, c, h, w = x.shape
        p, k = cfg["patch_size"], cfg["num_gaussians"]
        gh, gw = h // p, w // p
        # Patch embedding: conv with kernel = stride = p, then the fixed positions.
        xp = x.reshape(bsz, c, gh, p, gw, p)
        tokens = np.einsum("bcyaxe,dcae->byxd", xp, sd["pos_embed.proj.weight"])
        hid = tokens.reshape(bsz, gh * gw, self.d) + sd["pos_embed.proj.bias"]
        hid = hid + self.pos_embed(gh, gw)[None]
        # Conditioning: flip_sin_to_cos sinusoid with downscale_freq_shift 0, MLP, label table.
        freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128.0)
        args = np.asarray(t, np.float64)[:, None] * freqs[None]
        temb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
        temb = self.linear(
            "emb.timestep_embedder.linear_2",
            _silu(self.linear("emb.timestep_embedder.linear_1", temb)),
        )
        cond = temb + sd["emb.class_embedder.embedding_table.weight"][np.asarray(y)]
        for i in range(cfg["num_layers"]):
            blk = f"transformer_blocks.{i}"
            mod = self.linear(f"{blk}.norm1.linear", _silu(cond))
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = np.split(mod, 6, axis=-1)
            z = _layer_norm(hid, 1e-6) * (1 + sc_a[:, None]) + sh_a[:, None]
            hid = hid + g_a[:, None] * self.attention(f"{blk}.attn1", z)
            z = _layer_norm(hid, 1e-5) * (1 + sc_m[:, None]) + sh_m[:, None]
            ff = self.linear(f"{blk}.ff.net.2", _gelu_tanh(self.linear(f"{blk}.ff.net.0.proj", z)))
            hid = hid + g_m[:, None] * ff
        shift, scale = np.split(self.linear("proj_out_1", _silu(cond)), 2, axis=-1)
        hid = _layer_norm(hid, 1e-6) * (1 + scale[:, None]) + shift[:, None]
        out = self.linear("proj_out_2", hid)
        g = k * (c + 1)
        out = out.reshape(bsz, gh, gw, p, p, g).transpose(0, 5, 1, 3, 2, 4).reshape(bsz, g, h, w)
        means = out[:, : k * c].reshape(bsz, k, c, h, w)
        logweights = _log_softmax(out[:, k * c :].reshape(bsz, k, 1, h, w), axis=1)
        lam = self.linear(
            "gm_out.logstd_layers.3",
            _silu(self.linear("gm_out.logstd_layers.1", _silu(cond))),
        )
        return means, logweights, lam.reshape(bsz, 1, 1, 1, 1)


def _official_spectrum(sd: dict, base_size, mean, var):
    """The reference SpectrumMLP in float64 NumPy: mean [B,C,H,W], var [B,1,H,W] -> log-var [B,C,H,W]."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    stats = np.stack([var.mean(axis=(-3, -2, -1)), mean.var(axis=(-2, -1), ddof=1).mean(-1)], -1)
    hid = _silu(stats @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    hid = _silu(hid @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    c, bh, bw = base_size
    spec = (hid @ sd["mlp.4.weight"].T + sd["mlp.4.bias"]).reshape(-1, c, bh, bw)
    h, w = mean.shape[-2:]
    if (h, w) != (bh, bw):
        h1, w1 = (h + 1) // 2, (w + 1) // 2
        rows = list(range(h1)) + list(range(bh - (h - h1), bh))
        cols = list(range(w1)) + list(range(bw - (w - w1), bw))
        spec = spec[:, :, rows][:, :, :, cols]
    logvar = _log_softmax(spec.reshape(-1, c, h * w), axis=-1) + math.log(h * w)
    return logvar.reshape(-1, c, h, w)


# ----------------------------------------------------------------------------------------------
# Shared inputs
# ----------------------------------------------------------------------------------------------


def _inputs(seed: int = 0):
    """A batch NHWC, raw float times (incl. the ends) and labels incl. the null label."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([0.0, 371.5, 999.0], np.float32)
    y = np.array([0, 7, TINY_DIT_CONFIG["num_embeds_ada_norm"]], np.int32)
    return x, t, y


_forward = nnx.jit(lambda model, x, t, y: model(x, t, y))
_spectrum = nnx.jit(lambda net, mean, var: net(mean, var))


def _assert_matches_oracle(model, oracle: _OfficialGMDiT, seed: int = 0) -> None:
    """Our forward (NHWC) equals the NCHW oracle within 1e-4, and the outputs are not degenerate."""
    x, t, y = _inputs(seed)
    gm = _forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    means, logweights, logstds = oracle(x.transpose(0, 3, 1, 2), t, y)
    ref_means = means.transpose(0, 3, 4, 1, 2)
    ref_logweights = logweights.transpose(0, 3, 4, 1, 2)
    assert gm.means.shape == ref_means.shape == (3, 8, 8, 2, 4)
    assert gm.logweights.shape == ref_logweights.shape == (3, 8, 8, 2, 1)
    assert np.std(ref_means) > 0.3 and np.std(ref_logweights) > 0.05 and np.std(logstds) > 0.01
    np.testing.assert_allclose(gm.means, ref_means, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gm.logweights, ref_logweights, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gm.logstds, logstds, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    """Random official-layout transformer and spectrum state dicts and their oracle."""
    dit_sd = random_state_dict(official_transformer_layout(TINY_DIT_CONFIG), seed=1)
    spec_sd = random_state_dict(official_spectrum_layout(TINY_SPECTRUM_CONFIG), seed=2)
    return {"dit": dit_sd, "spec": spec_sd, "oracle": _OfficialGMDiT(dit_sd, TINY_DIT_CONFIG)}


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["list", "scan"])
def test_cli_converted_forward_matches_numpy_oracle(tmp_path, tiny, scan_blocks):
    """tools/convert_official_checkpoint.py output, loaded in either block layout, equals the oracle."""
    write_official_folder(tmp_path / "official", tiny["dit"], tiny["spec"])
    argv = ["--src", str(tmp_path / "official"), "--out_dir", str(tmp_path / "out")]
    assert load_convert_cli().main(argv + (["--scan_blocks"] if scan_blocks else [])) == 0
    manifest = json.loads((tmp_path / "out" / converted_folder.MANIFEST_NAME).read_text())
    assert manifest["block_layout"] == ("scan" if scan_blocks else "list")
    assert manifest["components"] == ["transformer", "spectrum_net"]
    models = converted_folder.load_official(str(tmp_path / "out"))
    assert models.transformer.config.scan_blocks == scan_blocks
    assert models.vae is None
    _assert_matches_oracle(models.transformer, tiny["oracle"])
    # The other layout, restacked at load time, is the same network.
    other = converted_folder.load_official(str(tmp_path / "out"), scan_blocks=not scan_blocks)
    assert other.transformer.config.scan_blocks == (not scan_blocks)
    _assert_matches_oracle(other.transformer, tiny["oracle"], seed=1)


def test_raw_bf16_variant_converts_exactly_and_matches_oracle(tmp_path, tiny):
    """A bf16-only official folder loads (falling back from fp32) with the exact bf16 values."""
    dit_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tiny["dit"].items()}
    spec_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tiny["spec"].items()}
    write_official_folder(tmp_path, dit_bf16, spec_bf16, variant="bf16")
    models = converted_folder.load_official(
        str(tmp_path), scan_blocks=True
    )  # no fp32 file: bf16 fallback
    rounded = {k: v.astype(np.float32) for k, v in dit_bf16.items()}
    assert not np.array_equal(rounded["proj_out_2.weight"], tiny["dit"]["proj_out_2.weight"])
    _assert_matches_oracle(models.transformer, _OfficialGMDiT(rounded, TINY_DIT_CONFIG))
    kernel = np.asarray(nnx.state(models.transformer)["patch_embed"]["kernel"][...])
    w = rounded["pos_embed.proj.weight"]  # (D, C, p, p): patch vector index (a*p + b)*C + c
    assert kernel[(1 * 2 + 0) * 4 + 3, 5] == w[5, 3, 1, 0]


@pytest.mark.parametrize("size", [8, 6, 5], ids=["base", "crop_even", "crop_odd"])
def test_spectrum_net_matches_numpy_oracle(tiny, size):
    """Converted SpectrumMLP psi equals the reference forward, incl. the frequency crop (§6.3)."""
    params = key_table.convert_spectrum_state_dict(tiny["spec"], (4, 8, 8), (16, 8))
    net = spectrum_from_params((4, 8, 8), (16, 8), params)
    rng = np.random.default_rng(3)
    mean = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    var = np.exp(rng.standard_normal((2, size, size, 1))).astype(np.float32)
    psi = _spectrum(net, jnp.asarray(mean), jnp.asarray(var))
    ref = _official_spectrum(
        tiny["spec"], (4, 8, 8), mean.transpose(0, 3, 1, 2), var.transpose(0, 3, 1, 2)
    )
    assert np.std(ref) > 0.1
    np.testing.assert_allclose(psi, ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_official_xl_layout_is_what_the_converter_expects():
    """The converter's expected keys/shapes for the XL config equal the published layout and counts."""
    layout = official_transformer_layout(XL_DIT_CONFIG)
    assert sum(math.prod(s) for s in layout.values()) == 676_164_001
    config = official_config.gm_dit_config_from_official(XL_DIT_CONFIG)
    assert key_table.expected_official_shapes(config) == layout
    spec_layout = official_spectrum_layout(XL_SPECTRUM_CONFIG)
    assert sum(math.prod(s) for s in spec_layout.values()) == 37_576
    spec_sd = random_state_dict(spec_layout, seed=4)
    cfg = official_config.spectrum_config_from_official(XL_SPECTRUM_CONFIG)
    params = key_table.convert_spectrum_state_dict(spec_sd, cfg["base_size"], cfg["layers"])
    np.testing.assert_array_equal(params["linear_out.kernel"], spec_sd["mlp.4.weight"].T)


def test_fixed_position_buffer_is_checked_not_stored(tiny):
    """A `pos_embed.pos_embed` buffer equal to the sin-cos table is accepted; a wrong one is refused."""
    config = official_config.gm_dit_config_from_official(TINY_DIT_CONFIG)
    oracle = tiny["oracle"]
    table = oracle.pos_embed(4, 4)[None].astype(np.float32)
    params = key_table.convert_transformer_state_dict(
        {**tiny["dit"], "pos_embed.pos_embed": table}, config
    )
    assert not any("pos" in k and "patch" not in k for k in params)
    with pytest.raises(ValueError, match="pos_embed.pos_embed"):
        key_table.convert_transformer_state_dict(
            {**tiny["dit"], "pos_embed.pos_embed": table[:, ::-1]}, config
        )


def test_state_dict_problems_are_all_reported(tiny):
    """Missing, unknown and mis-shaped keys are listed by name in one ValueError."""
    config = official_config.gm_dit_config_from_official(TINY_DIT_CONFIG)
    sd = dict(tiny["dit"])
    del sd["transformer_blocks.1.attn1.to_k.bias"]
    sd["transformer_blocks.2.attn1.to_q.weight"] = sd["transformer_blocks.0.attn1.to_q.weight"]
    sd["proj_out_2.weight"] = sd["proj_out_2.weight"][:-1]
    with pytest.raises(ValueError) as err:
        key_table.convert_transformer_state_dict(sd, config)
    msg = str(err.value)
    assert "missing keys" in msg and "transformer_blocks.1.attn1.to_k.bias" in msg
    assert "unmapped keys" in msg and "transformer_blocks.2.attn1.to_q.weight" in msg
    assert "shape mismatches" in msg and "proj_out_2.weight" in msg


@pytest.mark.parametrize(
    "override,match",
    [
        ({"constant_logstd": 0.5}, "constant_logstd"),
        ({"gm_num_logstd_layers": 3}, "gm_num_logstd_layers"),
        ({"_class_name": "_GMDiTTransformer2DModelV2"}, "V1"),
        ({"norm_eps": 1e-6}, "norm_eps"),
        ({"out_channels": 8}, "out_channels"),
    ],
)
def test_unsupported_official_configs_are_refused(override, match):
    """Options GM-DiT does not implement raise a ValueError naming the option."""
    with pytest.raises(ValueError, match=match):
        official_config.gm_dit_config_from_official({**TINY_DIT_CONFIG, **override})


def test_loading_a_folder_that_is_neither_form_fails_clearly(tmp_path):
    """A path without a manifest or transformer/config.json raises FileNotFoundError naming both."""
    with pytest.raises(FileNotFoundError, match="transformer/config.json"):
        converted_folder.load_official(str(tmp_path))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(TINY_DIT_CONFIG))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        converted_folder.load_official(str(tmp_path))

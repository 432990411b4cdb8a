"""FID InceptionV3: weight layout, converter, resize, and the forward pass against a numpy oracle.

The oracle is a float64 numpy re-implementation of the PyTorch FID Inception (NCHW, OIHW weights read
straight from the state_dict), so it checks the architecture, the converter's transposes, the
resize and the normalization at once. Random weights stand in for the real file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from gmflow_jax.eval import inception as inc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_tool():
    """The converter script as a module."""
    spec = importlib.util.spec_from_file_location(
        "convert_inception_weights", ROOT / "tools" / "convert_inception_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A random state_dict in the FID Inception layout (He-scaled convs, mild BatchNorm stats)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for m in inc.weight_mappings():
        shape, key = m.torch_shape, m.torch_key
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.7, 1.3, size=shape)
        elif key.endswith("bn.running_var"):
            value = rng.uniform(0.5, 2.0, size=shape)
        elif key == "fc.weight":
            value = rng.normal(size=shape) / np.sqrt(shape[1])
        else:  # bn.bias, bn.running_mean, fc.bias
            value = rng.normal(size=shape) * 0.1
        sd[key] = value.astype(np.float32)
        if key.endswith("bn.running_var"):
            sd[key.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    return sd


# ------------------------------------------------------------------------------------------------
# numpy oracle (NCHW, float64)


def np_conv(x, w, stride=1, pad=(0, 0)):
    """Cross-correlation of x [N, C, H, W] with w [O, C, kh, kw], zero padding (ph, pw)."""
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    ho, wo = win.shape[2], win.shape[3]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    out = cols @ w.reshape(o, c * kh * kw).T
    return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def np_basic(sd, name, x, stride=1, pad=(0, 0)):
    """conv -> BatchNorm(eps 1e-3, running stats) -> ReLU with the state_dict's arrays."""
    y = np_conv(x, sd[f"{name}.conv.weight"], stride, pad)

    def col(suffix):
        return sd[f"{name}.bn.{suffix}"][None, :, None, None]

    y = (y - col("running_mean")) / np.sqrt(col("running_var") + 1e-3) * col("weight") + col("bias")
    return np.maximum(y, 0.0)


def np_max_pool(x, stride, pad):
    """3x3 max pool, padding with -inf."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(-2, -1))


def np_avg_pool_no_pad_count(x):
    """3x3 stride-1 average over the in-image pixels of each window (count_include_pad=False)."""
    h, w = x.shape[2:]
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            out[:, :, i, j] = win.mean(axis=(-2, -1))
    return out


def np_block_a(sd, p, x):
    b1 = np_basic(sd, f"{p}.branch1x1", x)
    b5 = np_basic(sd, f"{p}.branch5x5_2", np_basic(sd, f"{p}.branch5x5_1", x), pad=(2, 2))
    b3 = np_basic(sd, f"{p}.branch3x3dbl_1", x)
    b3 = np_basic(sd, f"{p}.branch3x3dbl_2", b3, pad=(1, 1))
    b3 = np_basic(sd, f"{p}.branch3x3dbl_3", b3, pad=(1, 1))
    bp = np_basic(sd, f"{p}.branch_pool", np_avg_pool_no_pad_count(x))
    return np.concatenate([b1, b5, b3, bp], axis=1)


def np_block_b(sd, p, x):
    b3 = np_basic(sd, f"{p}.branch3x3", x, stride=2)
    bd = np_basic(sd, f"{p}.branch3x3dbl_1", x)
    bd = np_basic(sd, f"{p}.branch3x3dbl_2", bd, pad=(1, 1))
    bd = np_basic(sd, f"{p}.branch3x3dbl_3", bd, stride=2)
    return np.concatenate([b3, bd, np_max_pool(x, 2, 0)], axis=1)


def np_block_c(sd, p, x):
    b1 = np_basic(sd, f"{p}.branch1x1", x)
    b7 = np_basic(sd, f"{p}.branch7x7_1", x)
    b7 = np_basic(sd, f"{p}.branch7x7_2", b7, pad=(0, 3))
    b7 = np_basic(sd, f"{p}.branch7x7_3", b7, pad=(3, 0))
    bd = np_basic(sd, f"{p}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)], strict=True):
        bd = np_basic(sd, f"{p}.branch7x7dbl_{i}", bd, pad=pad)
    bp = np_basic(sd, f"{p}.branch_pool", np_avg_pool_no_pad_count(x))
    return np.concatenate([b1, b7, bd, bp], axis=1)


def np_block_d(sd, p, x):
    b3 = np_basic(sd, f"{p}.branch3x3_2", np_basic(sd, f"{p}.branch3x3_1", x), stride=2)
    b7 = np_basic(sd, f"{p}.branch7x7x3_1", x)
    b7 = np_basic(sd, f"{p}.branch7x7x3_2", b7, pad=(0, 3))
    b7 = np_basic(sd, f"{p}.branch7x7x3_3", b7, pad=(3, 0))
    b7 = np_basic(sd, f"{p}.branch7x7x3_4", b7, stride=2)
    return np.concatenate([b3, b7, np_max_pool(x, 2, 0)], axis=1)


def np_block_e(sd, p, x, pool):
    b1 = np_basic(sd, f"{p}.branch1x1", x)
    b3 = np_basic(sd, f"{p}.branch3x3_1", x)
    b3 = np.concatenate(
        [
            np_basic(sd, f"{p}.branch3x3_2a", b3, pad=(0, 1)),
            np_basic(sd, f"{p}.branch3x3_2b", b3, pad=(1, 0)),
        ],
        axis=1,
    )
    bd = np_basic(sd, f"{p}.branch3x3dbl_1", x)
    bd = np_basic(sd, f"{p}.branch3x3dbl_2", bd, pad=(1, 1))
    bd = np.concatenate(
        [
            np_basic(sd, f"{p}.branch3x3dbl_3a", bd, pad=(0, 1)),
            np_basic(sd, f"{p}.branch3x3dbl_3b", bd, pad=(1, 0)),
        ],
        axis=1,
    )
    pooled = np_avg_pool_no_pad_count(x) if pool == "avg" else np_max_pool(x, 1, 1)
    bp = np_basic(sd, f"{p}.branch_pool", pooled)
    return np.concatenate([b1, b3, bd, bp], axis=1)


def np_resize(img, out_size, mode):
    """Bilinear resize of img [N, H, W, C] by gathering the 4 neighbours of each output pixel."""

    def coords(n_in):
        d = np.arange(out_size, dtype=np.float64)
        s = n_in / out_size
        src = d * s if mode == "tf1" else np.clip((d + 0.5) * s - 0.5, 0, None)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = coords(img.shape[1])
    x0, x1, fx = coords(img.shape[2])
    fy, fx = fy[None, :, None, None], fx[None, None, :, None]
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bottom = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy) + bottom * fy


def np_inception(sd, images):
    """float64 forward of images [N, H, W, 3] in [0, 255]: (pool, logits, spatial)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = (np_resize(np.asarray(images, np.float64), 299, "tf1") - 128.0) / 128.0
    x = x.transpose(0, 3, 1, 2)
    x = np_basic(sd, "Conv2d_1a_3x3", x, stride=2)
    x = np_basic(sd, "Conv2d_2a_3x3", x)
    x = np_basic(sd, "Conv2d_2b_3x3", x, pad=(1, 1))
    x = np_max_pool(x, 2, 0)
    x = np_basic(sd, "Conv2d_3b_1x1", x)
    x = np_basic(sd, "Conv2d_4a_3x3", x)
    x = np_max_pool(x, 2, 0)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = np_block_a(sd, name, x)
    x = np_block_b(sd, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        if name == "Mixed_6d":
            spatial = np_basic(sd, "Mixed_6d.branch1x1", x)[:, :7]  # [N, 7, 17, 17]
        x = np_block_c(sd, name, x)
    x = np_block_d(sd, "Mixed_7a", x)
    x = np_block_e(sd, "Mixed_7b", x, "avg")
    x = np_block_e(sd, "Mixed_7c", x, "max")
    pool = x.mean(axis=(2, 3))
    logits = pool @ sd["fc.weight"].T + sd["fc.bias"]
    spatial = spatial.transpose(0, 2, 3, 1).reshape(len(images), -1)  # channel-last flattening
    return pool, logits, spatial


# ------------------------------------------------------------------------------------------------
# tests


def test_weight_layout_matches_torchvision_inception_listing():
    """94 conv blocks x 5 entries + fc; shapes as printed by torchvision's Inception3."""
    mappings = inc.weight_mappings()
    keys = {m.torch_key: m for m in mappings}
    assert len(mappings) == 94 * 5 + 2 == len(keys)
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert keys[key].torch_shape == shape, key
    assert keys["Mixed_6b.branch7x7_2.conv.weight"].param_shape == (1, 7, 128, 128)
    assert keys["fc.weight"].param_shape == (2048, 1008)
    assert keys["Mixed_5b.branch1x1.bn.running_mean"].param_path == "Mixed_5b/branch1x1/bn/mean"
    assert not any("AuxLogits" in k for k in keys)


@pytest.mark.parametrize("mode", ["tf1", "pytorch"])
@pytest.mark.parametrize("size_in", [(64, 48), (300, 512), (299, 299)])
def test_resize_matches_neighbour_gather_oracle(mode, size_in):
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, size=(2, *size_in, 3))
    got = np.asarray(inc.resize_bilinear(jnp.asarray(img, jnp.float32), (299, 299), mode))
    want = np_resize(img, 299, mode)
    # The kernel computes source coordinates in float32 (as TF and PyTorch do): their rounding
    # (<= size * 2^-24, doubled for the scale) times the largest neighbour difference, 255.
    atol = 255.0 * max(size_in) * 2.0**-22
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    if size_in == (299, 299):
        np.testing.assert_allclose(got, img, atol=1e-4)


def test_pytorch_resize_matches_jax_image_resize_when_upsampling():
    img = np.random.default_rng(2).uniform(0, 255, size=(1, 64, 40, 3)).astype(np.float32)
    got = inc.resize_bilinear(jnp.asarray(img), (299, 299), "pytorch")
    want = jax.image.resize(img, (1, 299, 299, 3), "linear", antialias=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3)
    tf1 = inc.resize_bilinear(jnp.asarray(img), (299, 299), "tf1")
    assert float(jnp.max(jnp.abs(tf1 - want))) > 1.0  # the two samplings really differ


def test_converter_rejects_mismatched_state_dicts():
    sd = random_state_dict(3)
    params = inc.convert_torch_state_dict(sd)
    assert len(params) == 472
    assert params["Conv2d_1a_3x3/conv/kernel"].shape == (3, 3, 3, 32)
    np.testing.assert_array_equal(
        params["Mixed_6b/branch7x7_2/conv/kernel"][0, 5, 3, 9],
        sd["Mixed_6b.branch7x7_2.conv.weight"][9, 3, 0, 5],
    )
    np.testing.assert_array_equal(params["fc/kernel"][17, 3], sd["fc.weight"][3, 17])

    missing = dict(sd)
    del missing["Mixed_7c.branch1x1.bn.running_mean"]
    with pytest.raises(ValueError, match="Mixed_7c.branch1x1.bn.running_mean"):
        inc.convert_torch_state_dict(missing)
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        inc.convert_torch_state_dict(extra)
    wrong = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match=r"fc.weight.*\(1000, 2048\)"):
        inc.convert_torch_state_dict(wrong)
    with pytest.raises(ValueError, match="resize_mode"):
        inc.inception_from_params(params, resize_mode="nearest")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random state_dict -> .npz -> tool -> .npz -> network."""
    tmp = tmp_path_factory.mktemp("inception")
    sd = random_state_dict(0)
    np.savez(tmp / "state_dict.npz", **sd)
    assert _load_tool().main([str(tmp / "state_dict.npz"), str(tmp / "params.npz")]) == 0
    return sd, inc.load_fid_inception(str(tmp / "params.npz"))


def test_forward_matches_numpy_oracle_on_resized_64px_and_299px_inputs(converted):
    sd, model = converted
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    out = inc.extract_features(model, small, batch_size=2)
    assert out.pool.shape == (2, 2048)
    assert out.logits.shape == (2, 1008)
    assert out.spatial.shape == (2, 2023)
    # The oracle costs ~3 s of CPU per image: check image 0 of the batch of 2.
    pool, logits, spatial = np_inception(sd, small[:1])
    assert np.max(np.abs(out.pool[1] - out.pool[0])) > 1e-3 * np.max(np.abs(pool))
    for name, got, want in [
        ("pool", out.pool[:1], pool),
        ("logits", out.logits[:1], logits),
        ("spatial", out.spatial[:1], spatial),
    ]:
        scale = np.max(np.abs(want))
        assert scale > 1e-2, name  # the random network does not collapse to zero
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0, err_msg=name)
    # ADM's IS logits: the fc weight without the bias.
    no_bias = model.logits_from_pool(jnp.asarray(out.pool[:1]), include_bias=False)
    np.testing.assert_allclose(np.asarray(no_bias), logits - sd["fc.bias"], atol=1e-4 * scale)

    # An iterable of uneven batches (each padded to batch_size) gives the same rows in order.
    split = inc.extract_features(model, iter([small[1:], small[:1], small]), batch_size=2)
    assert split.pool.shape == (4, 2048)
    np.testing.assert_allclose(split.pool[[1, 0, 2, 3]], np.tile(out.pool, (2, 1)), atol=1e-6)

    # A 299x299 input skips the resize; the network (compiled above) is reused.
    big = np.asarray(np_resize(small.astype(np.float64), 299, "tf1"), np.float32)
    out299 = inc.extract_features(model, big, batch_size=2)
    assert out299.pool.shape == (2, 2048) and out299.logits.shape == (2, 1008)
    np.testing.assert_allclose(out299.pool[:1], pool, atol=1e-4 * np.max(np.abs(pool)), rtol=0)


def test_shapes_for_direct_call_on_64px_input(converted):
    _, model = converted
    shapes = jax.eval_shape(model, jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.uint8))
    assert shapes.pool.shape == (3, 2048)
    assert shapes.logits.shape == (3, 1008)
    assert shapes.spatial.shape == (3, 2023)
    with pytest.raises(ValueError, match="images must have shape"):
        model(jnp.zeros((1, 64, 64, 1)))


def test_tool_reads_pth_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sd = random_state_dict(5)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "sd.pth")
    assert _load_tool().main([str(tmp_path / "sd.pth"), str(tmp_path / "p.npz")]) == 0
    with np.load(tmp_path / "p.npz") as p:
        np.testing.assert_array_equal(p["fc/kernel"], sd["fc.weight"].T)


def test_tool_checks_the_hash_prefix_in_a_torch_hub_file_name(tmp_path):
    tool = _load_tool()
    payload = b"not really weights"
    sha = hashlib.sha256(payload).hexdigest()
    good = tmp_path / f"weights-{sha[:8]}.pth"
    good.write_bytes(payload)
    assert tool.check_hash_prefix(str(good)) == sha
    bad = tmp_path / "weights-00000000.pth"
    bad.write_bytes(payload)
    with pytest.raises(SystemExit, match="does not start with 00000000"):
        tool.check_hash_prefix(str(bad))
    with pytest.raises(SystemExit, match="must end in .npz"):
        tool.main([str(good), str(tmp_path / "out.bin")])

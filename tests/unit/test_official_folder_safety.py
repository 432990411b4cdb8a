"""Official-weight folders are written atomically and read defensively (gmflow_jax.interop).

Properties checked, each against a plain oracle (file bytes, hand-built folders, independent
SHA-256, weights read straight from the official-layout state dicts of `helpers.official_layout`):

* a conversion that fails part-way (an injected error after the first file, or a failed rename
  into place) leaves the old folder byte-identical and loadable; a successful one replaces it and
  leaves nothing beside it; a folder that is not an earlier conversion is never replaced;
* the loader reads exactly the manifest's components and refuses a folder that disagrees with
  its manifest (a listed file deleted, a stale component folder, an extra file, a changed file);
* shapes are checked before blocks are stacked, with the key, its shape and the expected shape;
* integer config fields are never truncated; every read error names its file; relative paths
  from an index or a run config stay inside their folder; the converter CLIs print one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
from flax import nnx
from helpers.official_layout import (
    PIPELINE_DIT_CONFIG,
    PIPELINE_VAE_CONFIG,
    TINY_DIT_CONFIG,
    TINY_SPECTRUM_CONFIG,
    load_convert_cli,
    load_convert_vae_cli,
    official_spectrum_layout,
    official_transformer_layout,
    random_state_dict,
    vae_state_dict,
    write_official_folder,
)
from safetensors.numpy import save_file

from gmflow_jax.interop import converted_folder, official_config, staged_folder
from gmflow_jax.interop.converted_folder import MANIFEST_NAME, load_official
from gmflow_jax.models.builder import gm_dit_config_to_dict
from gmflow_jax.pipeline import GMFlowPipeline

D = TINY_DIT_CONFIG["num_attention_heads"] * TINY_DIT_CONFIG["attention_head_dim"]  # 64


@pytest.fixture(scope="module")
def weights():
    """Two different official transformer state dicts (A, B) and one spectrum state dict."""
    layout = official_transformer_layout(TINY_DIT_CONFIG)
    return {
        "a": random_state_dict(layout, seed=1),
        "b": random_state_dict(layout, seed=7),
        "spec": random_state_dict(official_spectrum_layout(TINY_SPECTRUM_CONFIG), seed=2),
    }


def _official(root: pathlib.Path, dit: dict, spec: dict | None) -> pathlib.Path:
    write_official_folder(root, dit, spec)
    return root


def _convert(src: pathlib.Path, out: pathlib.Path, *extra: str) -> int:
    return load_convert_cli().main(["--src", str(src), "--out_dir", str(out), *extra])


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _hidden_siblings(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def _final_proj(models) -> np.ndarray:
    """Our `final_proj.kernel` (the official `proj_out_2.weight`, transposed)."""
    return np.asarray(nnx.state(models.transformer)["final_proj"]["kernel"][...])


def _reseal(out: pathlib.Path, rel: str) -> None:
    """Record the current size and SHA-256 of `out/rel` in the manifest (isolates later checks)."""
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    data = (out / rel).read_bytes()
    manifest["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# Atomic conversion
# ----------------------------------------------------------------------------------------------


def test_failed_conversion_leaves_the_old_folder_identical_and_loadable(
    tmp_path, weights, monkeypatch, capsys
):
    """An error after the first file of a re-conversion: old folder byte-identical, CLI exit 1."""
    out = tmp_path / "out"
    assert _convert(_official(tmp_path / "a", weights["a"], weights["spec"]), out) == 0
    before = _snapshot(out)
    real_write = converted_folder.write_npz_atomic
    calls = []

    def write_then_fail(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device (injected)")
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(converted_folder, "write_npz_atomic", write_then_fail)
    assert _convert(_official(tmp_path / "b", weights["b"], weights["spec"]), out) == 1
    assert "No space left on device" in _one_error_line(capsys)
    assert len(calls) == 2  # the failure came after one complete file was written
    assert _snapshot(out) == before
    assert _hidden_siblings(out) == []  # the staged folder is gone
    models = load_official(str(out))
    np.testing.assert_array_equal(_final_proj(models), weights["a"]["proj_out_2.weight"].T)


def test_successful_reconversion_replaces_the_folder_and_leaves_nothing_beside_it(
    tmp_path, weights
):
    """Converting B over A's folder loads B, drops A's stale spectrum net, leaves no hidden folder."""
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is a valid target
    assert _convert(_official(tmp_path / "a", weights["a"], weights["spec"]), out) == 0
    assert _convert(_official(tmp_path / "b", weights["b"], None), out) == 0
    assert not (out / "spectrum_net").exists()
    assert _hidden_siblings(out) == []
    models = load_official(str(out))
    assert models.spectrum_net is None
    np.testing.assert_array_equal(_final_proj(models), weights["b"]["proj_out_2.weight"].T)


def test_failed_rename_into_place_puts_the_old_folder_back(tmp_path, weights, monkeypatch):
    """If the staged folder cannot take the old one's place, the old one is renamed back."""
    out = tmp_path / "out"
    assert _convert(_official(tmp_path / "a", weights["a"], weights["spec"]), out) == 0
    before = _snapshot(out)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(staged_folder.STAGE_PREFIX):
            raise OSError("rename refused (injected)")
        real_rename(src, dst)

    monkeypatch.setattr(staged_folder.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        converted_folder.convert_official_folder(str(tmp_path / "a"), str(out))
    assert _snapshot(out) == before
    assert _hidden_siblings(out) == []
    load_official(str(out), with_vae=False)


def test_a_folder_that_is_not_a_conversion_is_never_replaced(tmp_path, weights, capsys):
    """A non-empty foreign folder, a file, or the source itself as out_dir: refused, untouched."""
    src = _official(tmp_path / "a", weights["a"], None)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _convert(src, foreign) == 1
    assert "refusing to replace" in _one_error_line(capsys)
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    assert _convert(src, a_file) == 1
    assert "not a folder" in _one_error_line(capsys)
    assert a_file.read_bytes() == b"x"
    before = _snapshot(src)
    assert _convert(src, tmp_path) == 1  # holds the source
    assert "source folder" in _one_error_line(capsys)
    assert _snapshot(src) == before


def test_failed_vae_conversion_leaves_the_old_vae_folder_identical(tmp_path, monkeypatch, capsys):
    """tools/convert_vae.py stages its folder too: an error after the params file changes nothing."""
    cli = load_convert_vae_cli()
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps(PIPELINE_VAE_CONFIG))
    save_file(vae_state_dict(3), str(vae_dir / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "vae_jax"
    assert cli.main(["--vae_dir", str(vae_dir), "--out_dir", str(out)]) == 0
    before = _snapshot(out)
    assert sorted(before) == ["vae_config.json", "vae_params.npz"]

    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(converted_folder, "write_json_atomic", fail)  # after vae_params.npz
    save_file(vae_state_dict(4), str(vae_dir / "diffusion_pytorch_model.safetensors"))
    assert cli.main(["--vae_dir", str(vae_dir), "--out_dir", str(out)]) == 1
    assert "injected" in _one_error_line(capsys)
    assert _snapshot(out) == before and _hidden_siblings(out) == []
    converted_folder.load_vae_folder(str(out))


# ----------------------------------------------------------------------------------------------
# The loader and the manifest
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def converted(tmp_path, weights) -> pathlib.Path:
    """A converted folder with transformer and spectrum_net (list block layout)."""
    out = tmp_path / "out"
    assert _convert(_official(tmp_path / "a", weights["a"], weights["spec"]), out) == 0
    return out


def test_manifest_lists_every_file_with_its_size_and_sha256(converted):
    """The manifest's file table equals sizes and digests computed here from the bytes."""
    manifest = json.loads((converted / MANIFEST_NAME).read_text())
    assert manifest["components"] == ["transformer", "spectrum_net"]
    files = {
        str(p.relative_to(converted)): p.read_bytes()
        for p in converted.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    assert manifest["files"] == {
        rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for rel, data in files.items()
    }


def test_a_deleted_file_named_in_the_manifest_is_refused(converted):
    """No silent fallback to 'no spectral sampling' when spectrum_params.npz is gone."""
    (converted / "spectrum_net" / "spectrum_params.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"spectrum_net/spectrum_params\.npz"):
        load_official(str(converted))


def test_a_stale_component_folder_not_in_the_manifest_is_refused(tmp_path, weights, converted):
    """A spectrum_net/ left beside a manifest without it is an error naming the folder."""
    out = tmp_path / "dit_only"
    assert _convert(_official(tmp_path / "b", weights["b"], None), out) == 0
    (out / "spectrum_net").mkdir()
    for name in ("spectrum_config.json", "spectrum_params.npz"):
        (out / "spectrum_net" / name).write_bytes((converted / "spectrum_net" / name).read_bytes())
    with pytest.raises(ValueError, match=r"spectrum_net.*not among the components"):
        load_official(str(out))


def test_extra_and_changed_files_are_refused_naming_the_file(converted):
    """An unlisted file, a size change and a same-size edit are each refused with the file's name."""
    extra = converted / "transformer" / "old_params.npz"
    extra.write_bytes(b"junk")
    with pytest.raises(ValueError, match="old_params.npz"):
        load_official(str(converted))
    extra.unlink()
    config = converted / "transformer" / "gmdit_config.json"
    text = config.read_text()
    assert '"num_gaussians": 2' in text
    config.write_text(text.replace('"num_gaussians": 2', '"num_gaussians": 3'))  # same size
    with pytest.raises(ValueError, match=r"gmdit_config\.json: SHA-256 differs"):
        load_official(str(converted))
    config.write_text(text + " ")
    with pytest.raises(ValueError, match=r"gmdit_config\.json: \d+ bytes"):
        load_official(str(converted))


def test_a_manifest_of_another_format_is_refused(converted):
    """format_version 1 (no file table) and a damaged manifest both name the manifest."""
    path = converted / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME}: format_version=1"):
        load_official(str(converted))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME}: not valid JSON"):
        load_official(str(converted))


# ----------------------------------------------------------------------------------------------
# Shapes before stacking
# ----------------------------------------------------------------------------------------------


def test_wrong_block_shape_in_a_raw_folder_names_key_shape_and_expected(tmp_path, weights):
    """from_official (scan layout) on a raw folder with one mis-shaped block weight."""
    sd = dict(weights["a"])
    sd["transformer_blocks.1.attn1.to_q.weight"] = np.ones((D, D - 1), np.float32)
    src = _official(tmp_path / "bad", sd, None)
    with pytest.raises(ValueError) as info:
        GMFlowPipeline.from_official(str(src))
    msg = str(info.value)
    assert "transformer_blocks.1.attn1.to_q.weight (64, 63)" in msg
    assert f"expected ({D}, {D})" in msg
    assert "diffusion_pytorch_model.safetensors" in msg


def test_wrong_block_shape_in_a_converted_folder_is_named_before_stacking(converted):
    """A list-layout npz with one mis-shaped block, loaded in the scan layout (np.stack path)."""
    npz = converted / "transformer" / "gmdit_params.npz"
    with np.load(npz) as data:
        params = {k: data[k] for k in data.files}
    assert params["blocks.1.attn_q.kernel"].shape == (D, D)
    params["blocks.1.attn_q.kernel"] = np.ones((D, D - 1), np.float32)
    np.savez(npz, **params)
    _reseal(converted, "transformer/gmdit_params.npz")
    with pytest.raises(ValueError) as info:
        GMFlowPipeline.from_official(str(converted))  # scan_blocks=True: stacks the list layout
    msg = str(info.value)
    assert "gmdit_params.npz" in msg
    assert f"blocks.1.attn_q.kernel has shape (64, 63), expected ({D}, {D})" in msg


# ----------------------------------------------------------------------------------------------
# Config fields
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_layers", 2.7),
        ("num_attention_heads", "2"),
        ("patch_size", True),
        ("num_gaussians", None),
        ("sample_size", 0),
        ("norm_eps", "1e-5"),
    ],
)
def test_transformer_config_fields_are_never_truncated(key, value):
    """A non-integer (or non-number) field is refused naming the field and the value."""
    with pytest.raises(ValueError, match=rf"{key}={value!r}"):
        official_config.gm_dit_config_from_official({**TINY_DIT_CONFIG, key: value})


def test_integral_floats_are_read_exactly():
    """28.0-style integral floats are integers (no rounding involved); the result is an int."""
    config = official_config.gm_dit_config_from_official({**TINY_DIT_CONFIG, "num_layers": 2.0})
    assert config.num_layers == 2 and type(config.num_layers) is int


@pytest.mark.parametrize(
    "override,match",
    [
        ({"layers": [16.5, 8]}, r"layers\[0\]=16.5"),
        ({"layers": [16, 8, 4]}, "exactly two"),
        ({"base_size": [4, 8]}, r"base_size=\[4, 8\]"),
        ({"base_size": [4, 8, "8"]}, r"base_size\[2\]='8'"),
    ],
)
def test_spectrum_config_fields_are_checked(override, match):
    with pytest.raises(ValueError, match=match):
        official_config.spectrum_config_from_official({**TINY_SPECTRUM_CONFIG, **override})


def test_a_bad_config_field_in_a_raw_folder_names_the_file(tmp_path, weights, capsys):
    """Through the CLI: the config file and the field, one line, exit 1, nothing written."""
    src = _official(tmp_path / "a", weights["a"], None)
    (src / "transformer" / "config.json").write_text(
        json.dumps({**TINY_DIT_CONFIG, "num_layers": 2.7})
    )
    assert _convert(src, tmp_path / "out") == 1
    err = _one_error_line(capsys)
    assert "transformer/config.json" in err and "num_layers=2.7" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Errors name their file
# ----------------------------------------------------------------------------------------------


def test_damaged_safetensors_and_json_name_their_file(tmp_path, weights):
    src = _official(tmp_path / "a", weights["a"], weights["spec"])
    weights_file = src / "spectrum_net" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[8:16] = b"garbage!"  # the header's first bytes
    weights_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights_file}: not a readable safetensors"):
        load_official(str(src))
    (src / "transformer" / "config.json").write_text('{"num_layers": 2,')
    with pytest.raises(ValueError, match=r"transformer/config.json: not valid JSON"):
        load_official(str(src))


def test_damaged_npz_names_its_file(converted):
    """A truncated npz: the size check names it; re-sealed and unverified, the reader names it."""
    npz = converted / "spectrum_net" / "spectrum_params.npz"
    npz.write_bytes(npz.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"spectrum_params\.npz: 200 bytes"):
        load_official(str(converted))
    _reseal(converted, "spectrum_net/spectrum_params.npz")
    with pytest.raises(ValueError, match=r"spectrum_params\.npz: not a readable \.npz"):
        load_official(str(converted), verify_checksums=False)


def test_non_finite_official_weights_are_refused_at_conversion(tmp_path, weights, capsys):
    sd = dict(weights["a"])
    bad = sd["proj_out_1.bias"].copy()
    bad[3] = np.nan
    sd["proj_out_1.bias"] = bad
    assert _convert(_official(tmp_path / "a", sd, None), tmp_path / "out") == 1
    err = _one_error_line(capsys)
    assert "non-finite" in err and "proj_out_1.bias: 1 NaN" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Relative paths stay inside their folder
# ----------------------------------------------------------------------------------------------


def _sharded(root: pathlib.Path, sd: dict, shard_names: tuple[str, str]) -> pathlib.Path:
    """A raw folder whose transformer is two shards + an index naming them `shard_names`."""
    _official(root, sd, None)
    folder = root / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    for name, part in zip(("part1.safetensors", "part2.safetensors"), halves, strict=True):
        save_file({k: sd[k] for k in part}, str(folder / name))
    weight_map = {k: shard_names[0] for k in halves[0]} | {k: shard_names[1] for k in halves[1]}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    return root


def test_a_sharded_index_loads_and_its_shard_names_stay_inside(tmp_path, weights):
    good = _sharded(tmp_path / "good", weights["a"], ("part1.safetensors", "part2.safetensors"))
    models = load_official(str(good), with_vae=False)
    np.testing.assert_array_equal(_final_proj(models), weights["a"]["proj_out_2.weight"].T)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((good / "transformer" / "part2.safetensors").read_bytes())
    cases = (
        ("../../outside.safetensors", "leaves its folder"),
        (str(outside), "leaves its folder"),  # absolute
        ("link.safetensors", "outside its folder"),  # a symlink inside pointing out
    )
    for i, (name, match) in enumerate(cases):
        root = _sharded(tmp_path / f"bad{i}", weights["a"], ("part1.safetensors", name))
        (root / "transformer" / "link.safetensors").symlink_to(outside)
        with pytest.raises(ValueError, match=match):
            load_official(str(root), with_vae=False)


@pytest.mark.parametrize("vae", ["../official/vae", "/tmp/vae", "link"])
def test_run_config_vae_path_must_stay_inside_the_workdir(tmp_path, vae):
    """from_checkpoint refuses the config's vae path before restoring anything."""
    work = tmp_path / "run"
    work.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (work / "link").symlink_to(tmp_path / "elsewhere")
    model = gm_dit_config_to_dict(official_config.gm_dit_config_from_official(PIPELINE_DIT_CONFIG))
    (work / "config.json").write_text(json.dumps({"model": model, "vae": vae}))
    with pytest.raises(ValueError, match=r"config\.json: vae=.*(leaves|outside) its folder"):
        GMFlowPipeline.from_checkpoint(str(work))


def test_converter_cli_prints_one_line_for_a_multi_line_key_report(tmp_path, weights, capsys):
    """A state dict with several problems: every key named, on one line, exit 1."""
    sd = dict(weights["a"])
    del sd["transformer_blocks.0.attn1.to_k.bias"]
    sd["unknown.weight"] = np.zeros(3, np.float32)
    assert _convert(_official(tmp_path / "a", sd, None), tmp_path / "out") == 1
    err = _one_error_line(capsys)
    assert "transformer_blocks.0.attn1.to_k.bias" in err and "unknown.weight" in err
    assert _convert(tmp_path / "nope", tmp_path / "out") == 1
    assert "not an official diffusers GM-DiT folder" in _one_error_line(capsys)

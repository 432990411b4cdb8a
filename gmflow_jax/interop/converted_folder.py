"""Our converted form of the official checkpoint: writing it, and loading either form.

`convert_official_folder` (the library side of `tools/convert_official_checkpoint.py`) writes:

==================================  ===========================================================
file                                content
==================================  ===========================================================
`gmflow_jax_official.json`          manifest (below)
`transformer/gmdit_config.json`     the `GMDiTConfig` fields (JSON)
`transformer/gmdit_params.npz`      float32 parameters keyed by dotted path (`blocks.0.attn_q.kernel`)
`spectrum_net/spectrum_config.json` `{"base_size": [C, H0, W0], "layers": [n1, n2]}`
`spectrum_net/spectrum_params.npz`  float32 SpectrumMLP parameters (`linear_1.kernel`, ...)
`vae/vae_config.json`,              the VAE, as `convert_vae_folder` (`tools/convert_vae.py`)
`vae/vae_params.npz`                writes a VAE folder
==================================  ===========================================================

The manifest (format version 2) records the source folder, the block layout ("list" or "scan"),
the `components` written (always "transformer"; "spectrum_net" and "vae" when the source has
them), the weights file and parameter count of each, and `files`: every file above with its size in
bytes and SHA-256.

Writing (`convert_official_folder`, `convert_vae_folder`): the whole folder is staged beside the
target and renamed into place (`gmflow_jax.interop.staged_folder`), so a failure part-way leaves
the old folder untouched and loadable. An existing target is replaced only when it is empty or an
earlier output of the same converter (a manifest; for a VAE folder `vae_params.npz`); any other
folder is refused before any work. No non-finite value is written (`interop.key_table`).

Loading a converted folder (`load_official`) reads exactly the manifest's components, after
checking the folder against the manifest:

* a component folder (`transformer/`, `spectrum_net/`, `vae/`) that the manifest does not list is
  an error, not ignored: it is a leftover of another conversion, and which weights are meant is
  then unknown (convert again into a fresh folder);
* a listed file that is missing, a file whose size differs from the manifest, and a file in a
  component folder that the manifest does not list are errors naming the file (names starting
  with "." are ignored; entries beside the component folders are ignored too);
* with `verify_checksums` (the default), the files of every component loaded are hashed and
  compared with the manifest (about 2 s for the 2.7 GB XL transformer);
* the block layout of the manifest must agree with `gmdit_config.json`, and every array's shape is
  checked against the config before the blocks are (un)stacked; errors name the key, its shape,
  the expected shape and the file.

Every read error names its file (`gmflow_jax.interop.folder_files`).

==========================  =====================================================================
name                        what it is
==========================  =====================================================================
`convert_official_folder`   raw official folder -> converted folder (files above)
`convert_vae_folder`        a diffusers VAE folder -> `vae_params.npz` + `vae_config.json`
`is_converted_folder`       whether a path holds a converted folder (its manifest)
`load_official`             GM-DiT, SpectrumMLP (float32) and VAE of either form
`load_vae_folder`           a VAE from a converted folder or a diffusers `vae/` folder
==========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from gmflow_jax.atomic_file import write_json_atomic, write_npz_atomic
from gmflow_jax.interop.diffusers_folder import (
    OfficialModels,
    convert_spectrum_component,
    convert_transformer_component,
    convert_vae_weights,
    find_weights_file,
    is_official_folder,
    read_official_folder,
    read_vae_folder,
    vae_config_of,
)
from gmflow_jax.interop.folder_files import (
    contained_path,
    errors_name_file,
    read_json,
    read_npz,
    sha256_of_file,
)
from gmflow_jax.interop.key_table import list_layout_shapes
from gmflow_jax.interop.official_config import spectrum_config_from_official
from gmflow_jax.interop.staged_folder import replace_folder
from gmflow_jax.models.builder import (
    gm_dit_config_from_dict,
    gm_dit_config_to_dict,
    gm_dit_from_params,
    spectrum_from_params,
)
from gmflow_jax.models.flat_params import abstract_flat_params, stack_blocks, unstack_blocks
from gmflow_jax.models.gm_dit import GMDiT, GMDiTConfig
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params, vae_from_params

MANIFEST_NAME = "gmflow_jax_official.json"
"""Manifest of a converted folder."""

FORMAT_VERSION = 2
"""Version of the converted-folder format (2: the manifest lists every file with its SHA-256)."""

GMDIT_CONFIG_NAME = "gmdit_config.json"
GMDIT_PARAMS_NAME = "gmdit_params.npz"
SPECTRUM_CONFIG_NAME = "spectrum_config.json"
SPECTRUM_PARAMS_NAME = "spectrum_params.npz"
VAE_CONFIG_NAME = "vae_config.json"
VAE_PARAMS_NAME = "vae_params.npz"

COMPONENT_FILES: dict[str, tuple[str, str]] = {
    "transformer": (GMDIT_CONFIG_NAME, GMDIT_PARAMS_NAME),
    "spectrum_net": (SPECTRUM_CONFIG_NAME, SPECTRUM_PARAMS_NAME),
    "vae": (VAE_CONFIG_NAME, VAE_PARAMS_NAME),
}
"""The components of a converted folder, in order, and the (config, params) files of each."""

BLOCK_LAYOUTS = ("list", "scan")
"""Manifest `block_layout` values (`GMDiTConfig.scan_blocks` False / True)."""


def is_converted_folder(path: str) -> bool:
    """Whether `path` holds a folder written by `convert_official_folder` (its manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def is_converted_vae_folder(path: str) -> bool:
    """Whether `path` holds a VAE folder written by `convert_vae_folder` (`vae_params.npz`)."""
    return os.path.isfile(os.path.join(path, VAE_PARAMS_NAME))


# --------------------------------------------------------------------------------------------
# Checks shared by the loaders
# --------------------------------------------------------------------------------------------


def _check_shapes(path: str, what: str, params: Mapping[str, Any], expected: Mapping) -> None:
    """Raise a ValueError naming `path` unless `params` has exactly the keys and shapes expected."""
    want = {k: tuple(getattr(v, "shape", v)) for k, v in expected.items()}
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    bad = [
        f"{k} has shape {tuple(np.shape(params[k]))}, expected {want[k]}"
        for k in sorted(want)
        if k in params and tuple(np.shape(params[k])) != want[k]
    ]
    problems = []
    if bad:
        problems.append("shape mismatches: " + "; ".join(bad))
    if missing:
        problems.append(f"missing keys: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"unexpected keys: {extra[:10]}" + (" ..." if len(extra) > 10 else ""))
    if problems:
        raise ValueError(
            f"{path}: {what} parameters do not match its config: " + "; ".join(problems)
        )


def _stored_layout_shapes(config: GMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of `config` in its own block layout (list or scan)."""
    if not config.scan_blocks:
        return list_layout_shapes(config)
    abstract = abstract_flat_params(lambda: GMDiT(config, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in abstract.items()}


def _read_converted_vae(folder: str, dtype: Any) -> AutoencoderKL:
    """A VAE folder of `vae_config.json` + `vae_params.npz` (errors name the file)."""
    config = vae_config_of(os.path.join(folder, VAE_CONFIG_NAME), dtype)
    npz = os.path.join(folder, VAE_PARAMS_NAME)
    params = read_npz(npz)
    _check_shapes(npz, "VAE", params, abstract_vae_params(config))
    return vae_from_params(config, params)


def load_vae_folder(
    folder: str, *, variant: str | None = None, dtype: Any = "float32"
) -> AutoencoderKL:
    """A VAE from a converted folder (`vae_params.npz`) or a diffusers `vae/` folder."""
    if is_converted_vae_folder(folder):
        return _read_converted_vae(folder, dtype)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return read_vae_folder(folder, variant, dtype)
    raise FileNotFoundError(
        f"VAE folder {folder!r} holds neither {VAE_PARAMS_NAME!r} (converted) nor config.json "
        "(diffusers)"
    )


# --------------------------------------------------------------------------------------------
# Loading a converted folder
# --------------------------------------------------------------------------------------------


def _is_digest(value: Any) -> bool:
    """A lower-case hex SHA-256 digest."""
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the converted folder `root`, its fields checked (errors name the file)."""
    path = os.path.join(root, MANIFEST_NAME)
    manifest = read_json(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={version!r}; this code reads version {FORMAT_VERSION}: "
            "convert the official folder again"
        )
    components = manifest.get("components")
    if (
        not isinstance(components, list)
        or not all(isinstance(c, str) and c in COMPONENT_FILES for c in components)
        or len(set(components)) != len(components)
        or "transformer" not in components
    ):
        raise ValueError(
            f"{path}: components={components!r} must list distinct names from "
            f"{list(COMPONENT_FILES)}, including 'transformer'"
        )
    layout = manifest.get("block_layout")
    if layout not in BLOCK_LAYOUTS:
        raise ValueError(f"{path}: block_layout={layout!r} must be one of {BLOCK_LAYOUTS}")
    files = manifest.get("files")
    want = sorted(f"{c}/{name}" for c in components for name in COMPONENT_FILES[c])
    if not isinstance(files, dict) or sorted(files) != want:
        listed = sorted(files) if isinstance(files, dict) else files
        raise ValueError(
            f"{path}: files={listed!r} must list exactly the files of its components {want}"
        )
    for name, entry in files.items():
        ok = isinstance(entry, dict) and _is_digest(entry.get("sha256"))
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if not ok or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(
                f"{path}: files[{name!r}]={entry!r} must be {{'bytes': int >= 0, 'sha256': hex}}"
            )
    return manifest


def check_folder_matches_manifest(root: str, manifest: Mapping[str, Any]) -> None:
    """Raise unless the component folders and files of `root` are exactly the manifest's.

    Rules in the module docstring; sizes are compared here, digests by `_verify_component`.
    """
    path = os.path.join(root, MANIFEST_NAME)
    components = manifest["components"]
    for component, names in COMPONENT_FILES.items():
        folder = os.path.join(root, component)
        if component not in components:
            if os.path.lexists(folder):
                raise ValueError(
                    f"{folder!r} is not among the components {components} of {path}: the folder "
                    "disagrees with its manifest (a leftover of another conversion?); convert "
                    "again into a fresh folder"
                )
            continue
        for name in names:
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file!r} is named in {path} but missing")
            size, recorded = (
                os.path.getsize(file),
                manifest["files"][f"{component}/{name}"]["bytes"],
            )
            if size != recorded:
                raise ValueError(
                    f"{file}: {size} bytes, but {path} records {recorded}: the file changed after "
                    "conversion; convert again"
                )
        extra = sorted(n for n in os.listdir(folder) if not n.startswith(".") and n not in names)
        if extra:
            raise ValueError(
                f"{folder!r} holds files that {path} does not list: {extra}; remove them or "
                "convert again"
            )


def _verify_component(root: str, manifest: Mapping[str, Any], component: str) -> None:
    """Raise unless every file of `component` has the SHA-256 the manifest records."""
    for name in COMPONENT_FILES[component]:
        file = os.path.join(root, component, name)
        if sha256_of_file(file) != manifest["files"][f"{component}/{name}"]["sha256"]:
            raise ValueError(
                f"{file}: SHA-256 differs from the one in {os.path.join(root, MANIFEST_NAME)}: "
                "the file is damaged or was changed after conversion; convert again"
            )


def _load_converted(
    root: str, scan_blocks: bool | None, dtype: Any, with_vae: bool, verify: bool
) -> OfficialModels:
    """Load exactly the manifest's components of a folder written by `convert_official_folder`."""
    manifest = read_manifest(root)
    check_folder_matches_manifest(root, manifest)
    components = manifest["components"]
    wanted = [c for c in components if c != "vae" or with_vae]
    if verify:
        for component in wanted:
            _verify_component(root, manifest, component)

    config_path = os.path.join(root, "transformer", GMDIT_CONFIG_NAME)
    fields = read_json(config_path)
    with errors_name_file(config_path):
        stored = gm_dit_config_from_dict(fields)
    if manifest["block_layout"] != BLOCK_LAYOUTS[int(stored.scan_blocks)]:
        raise ValueError(
            f"{config_path}: scan_blocks={stored.scan_blocks} disagrees with block_layout="
            f"{manifest['block_layout']!r} of {os.path.join(root, MANIFEST_NAME)}"
        )
    want_scan = stored.scan_blocks if scan_blocks is None else scan_blocks
    config = dataclasses.replace(stored, scan_blocks=want_scan, dtype=dtype)
    npz = os.path.join(root, "transformer", GMDIT_PARAMS_NAME)
    params = read_npz(npz)
    # Why before (un)stacking: np.stack of a mis-shaped block fails without naming the key.
    _check_shapes(npz, "GM-DiT", params, _stored_layout_shapes(stored))
    if stored.scan_blocks and not want_scan:
        params = unstack_blocks(params, config.num_layers)
    elif want_scan and not stored.scan_blocks:
        params = stack_blocks(params, config.num_layers)
    transformer = gm_dit_from_params(config, params)
    del params

    spectrum = None
    if "spectrum_net" in components:
        spec_path = os.path.join(root, "spectrum_net", SPECTRUM_CONFIG_NAME)
        spec_fields = read_json(spec_path)
        with errors_name_file(spec_path):
            spec_cfg = spectrum_config_from_official(spec_fields)
        npz = os.path.join(root, "spectrum_net", SPECTRUM_PARAMS_NAME)
        spec_params = read_npz(npz)
        base_size, layers = spec_cfg["base_size"], spec_cfg["layers"]
        expected = abstract_flat_params(lambda: SpectrumMLP(base_size, layers, rngs=nnx.Rngs(0)))
        _check_shapes(npz, "SpectrumMLP", spec_params, expected)
        spectrum = spectrum_from_params(base_size, layers, spec_params)
    vae = None
    if with_vae and "vae" in components:
        vae = _read_converted_vae(os.path.join(root, "vae"), dtype)
    return OfficialModels(transformer, spectrum, vae)


def load_official(
    path: str,
    *,
    variant: str | None = None,
    scan_blocks: bool | None = None,
    dtype: Any = "float32",
    with_vae: bool = True,
    verify_checksums: bool = True,
) -> OfficialModels:
    """The GM-DiT, SpectrumMLP (None if absent) and VAE (None if absent or not wanted) of `path`.

    `path` is a folder written by `convert_official_folder` (checked against its manifest: module
    docstring; `verify_checksums` also compares the SHA-256 of every file loaded), or the raw
    official diffusers folder (converted in memory; `variant` picks the weights file, e.g.
    "bf16"). `scan_blocks` None keeps the stored layout (the list layout for a raw folder).
    `dtype` is the compute dtype of the GM-DiT and the VAE; the SpectrumMLP computes in float32
    (`models.image_denoiser`); parameters are float32.
    """
    if is_converted_folder(path):
        return _load_converted(path, scan_blocks, dtype, with_vae, verify_checksums)
    if is_official_folder(path):
        return read_official_folder(path, variant, bool(scan_blocks), dtype, with_vae)
    raise FileNotFoundError(
        f"{path!r} is neither a converted folder (no {MANIFEST_NAME}) nor an official diffusers "
        "GM-DiT folder (no transformer/config.json)"
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_component(
    stage: str,
    component: str,
    config: Mapping[str, Any],
    params: Mapping[str, np.ndarray],
    weights: str,
    manifest: dict[str, Any],
) -> None:
    """Write one component's config and params into `stage/component`, record them in `manifest`."""
    config_name, params_name = COMPONENT_FILES[component]
    folder = os.path.join(stage, component)
    os.makedirs(folder, exist_ok=True)
    write_npz_atomic(os.path.join(folder, params_name), **params)
    write_json_atomic(os.path.join(folder, config_name), config, sort_keys=True)
    for name in (config_name, params_name):
        file = os.path.join(folder, name)
        manifest["files"][f"{component}/{name}"] = {
            "bytes": os.path.getsize(file),
            "sha256": sha256_of_file(file),
        }
    manifest["components"].append(component)
    manifest["weights_files"][component] = os.path.basename(weights)
    manifest["num_params"][component] = int(sum(v.size for v in params.values()))


def _refuse_overlap(src: str, out_dir: str) -> None:
    """Refuse an `out_dir` that is `src` or holds it (replacing it would delete the source)."""
    real_src, real_out = os.path.realpath(src), os.path.realpath(out_dir)
    if real_src == real_out or real_src.startswith(real_out.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"out_dir={out_dir!r} is or holds the source folder src={src!r}; choose another out_dir"
        )


def convert_official_folder(
    src: str,
    out_dir: str,
    *,
    variant: str | None = None,
    scan_blocks: bool = False,
    with_vae: bool = True,
) -> dict[str, Any]:
    """Convert the official folder `src` into `out_dir` (layout and rules in the module docstring).

    Returns the manifest written (components, weights files read, parameter counts, files).
    """
    if not is_official_folder(src):
        raise FileNotFoundError(
            f"src={src!r} is not an official diffusers GM-DiT folder (no transformer/config.json)"
        )
    _refuse_overlap(src, out_dir)

    def write(stage: str) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "source": os.path.abspath(src),
            "block_layout": BLOCK_LAYOUTS[int(scan_blocks)],
            "components": [],
            "weights_files": {},
            "num_params": {},
            "files": {},
        }
        config, params, weights = convert_transformer_component(
            src, variant, scan_blocks=scan_blocks
        )
        _write_component(
            stage, "transformer", gm_dit_config_to_dict(config), params, weights, manifest
        )
        del params
        if os.path.isdir(os.path.join(src, "spectrum_net")):
            spec_cfg, params, weights = convert_spectrum_component(src, variant)
            _write_component(stage, "spectrum_net", spec_cfg, params, weights, manifest)
        vae_src = os.path.join(src, "vae")
        if with_vae and os.path.isdir(vae_src):
            vae_config = vae_config_of(os.path.join(vae_src, "config.json"))
            weights = find_weights_file(vae_src, variant)
            params = convert_vae_weights(weights, vae_config)
            _write_component(stage, "vae", vae_config.to_diffusers(), params, weights, manifest)
        # Why last: the manifest's presence marks a complete folder (`is_converted_folder`).
        write_json_atomic(os.path.join(stage, MANIFEST_NAME), manifest, sort_keys=True)
        return manifest

    return replace_folder(
        out_dir,
        write,
        replaceable=is_converted_folder,
        what=f"converted official folder (it has no {MANIFEST_NAME})",
    )


def convert_vae_folder(
    vae_dir: str,
    out_dir: str,
    *,
    variant: str | None = None,
    weights_name: str | None = None,
) -> dict[str, Any]:
    """Convert a diffusers VAE folder (`config.json` + safetensors) into `out_dir`.

    `out_dir` gets `vae_params.npz` (float32, dotted keys) and `vae_config.json`
    (`VAEConfig.to_diffusers`), staged and renamed into place like `convert_official_folder`; an
    existing `out_dir` is replaced only when empty or holding `vae_params.npz`. `weights_name`
    (inside `vae_dir`) overrides the weights file found by `variant`. Returns
    `{"params", "config"}` (paths in `out_dir`), `"num_params"` and `"weights_file"`.
    """
    config_path = os.path.join(vae_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"vae_dir={vae_dir!r} has no 'config.json'")
    if weights_name is None:
        weights = find_weights_file(vae_dir, variant)
    else:
        weights = contained_path(vae_dir, weights_name, "weights_name")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"vae_dir={vae_dir!r} has no {weights_name!r}")
    config: VAEConfig = vae_config_of(config_path)  # a bad config fails before any writing

    def write(stage: str) -> int:
        params = convert_vae_weights(weights, config)
        write_npz_atomic(os.path.join(stage, VAE_PARAMS_NAME), **params)
        write_json_atomic(
            os.path.join(stage, VAE_CONFIG_NAME), config.to_diffusers(), sort_keys=True
        )
        return int(sum(v.size for v in params.values()))

    num_params = replace_folder(
        out_dir,
        write,
        replaceable=is_converted_vae_folder,
        what=f"converted VAE folder (it has no {VAE_PARAMS_NAME})",
    )
    return {
        "params": os.path.join(out_dir, VAE_PARAMS_NAME),
        "config": os.path.join(out_dir, VAE_CONFIG_NAME),
        "num_params": num_params,
        "weights_file": os.path.basename(weights),
    }

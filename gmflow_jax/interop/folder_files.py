"""Reading the files of a weights folder: every error names its file; relative paths stay inside.

Weights folders come from elsewhere (a downloaded diffusers pipeline, a converted folder copied
between machines), so nothing read from them is trusted:

* every read error names the file it came from (a damaged safetensors header, invalid JSON, a
  truncated npz), as a ValueError (a missing file: FileNotFoundError naming the path);
* a relative path found inside a file (a safetensors index's shard names, a run config's `vae`
  folder) must stay inside the folder holding that file: absolute paths, `..` steps that leave the
  folder, and symlinks that resolve outside it are refused (`contained_path`).

==========================  =====================================================================
name                        what it is
==========================  =====================================================================
`contained_path`            `folder/relative`, refused unless it stays inside `folder`
`read_json`                 a JSON file holding an object, as a dict
`read_safetensors`          every array of a safetensors file, or of the shards of its index
`read_npz`                  every array of an .npz file (no pickles)
`errors_name_file`          context manager: a ValueError / TypeError / KeyError raised while
                            parsing the content of a file is re-raised as a ValueError naming it
`sha256_of_file`            hex SHA-256 digest of a file (the converted folder's manifest)
==========================  =====================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

INDEX_SUFFIX = ".safetensors.index.json"
"""Name ending of a sharded safetensors checkpoint's index (`{"weight_map": {key: shard}}`)."""

_HASH_CHUNK = 1 << 24
"""Bytes read per step when hashing (16 MiB: large files never sit in memory twice)."""


def contained_path(folder: str, relative: Any, what: str) -> str:
    """`folder/relative`, refused with a ValueError naming `what` unless it stays inside `folder`.

    Refused: a non-string or empty value, an absolute path, a path whose `..` steps leave `folder`,
    and a path whose resolved form (symlinks followed) lies outside the resolved `folder`.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{what}={relative!r} must be a non-empty relative path inside {folder!r}")
    # Why both forms of the check: the lexical one gives the clear message for `../x` and `/x`;
    # the resolved one also catches a symlink inside the folder that points out of it.
    normal = os.path.normpath(relative)
    if os.path.isabs(relative) or normal == ".." or normal.startswith(".." + os.sep):
        raise ValueError(
            f"{what}={relative!r} leaves its folder {folder!r}; only paths inside it are allowed "
            "(no absolute paths, no '..')"
        )
    path = os.path.join(folder, normal)
    root = os.path.realpath(folder)
    resolved = os.path.realpath(path)
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"{what}={relative!r} resolves to {resolved!r}, outside its folder {root!r} (a "
            "symlink?); only paths inside it are allowed"
        )
    return path


def _message(err: BaseException) -> str:
    """An exception's text for a one-line report (a KeyError's key, else str(err))."""
    if isinstance(err, KeyError) and err.args:
        return f"missing field {err.args[0]!r}"
    return str(err) or type(err).__name__


@contextlib.contextmanager
def errors_name_file(path: str) -> Iterator[None]:
    """Re-raise a ValueError / TypeError / KeyError of the block as a ValueError naming `path`."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as err:
        if isinstance(err, ValueError) and path in str(err):
            raise
        raise ValueError(f"{path}: {_message(err)}") from err


def read_json(path: str) -> dict[str, Any]:
    """A JSON file holding an object, as a dict; errors name `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value


def _load_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """One safetensors file; a damaged header or body raises a ValueError naming `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All arrays of a safetensors file, or of every shard listed by a `.safetensors.index.json`.

    Shard names must stay inside the index's folder (`contained_path`); every key the index lists
    must be in its shard, and no key may come from two shards.
    """
    if not path.endswith(INDEX_SUFFIX):
        return _load_safetensors_file(path)
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: 'weight_map' must be a non-empty object {{key: shard file}}")
    bad = sorted(k for k, shard in weight_map.items() if not isinstance(shard, str))
    if bad:
        raise ValueError(f"{path}: 'weight_map' values must be shard file names; see {bad[:5]}")
    folder = os.path.dirname(path)
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = contained_path(folder, shard, f"{path}: shard")
        for key, value in _load_safetensors_file(shard_path).items():
            if key in source:
                raise ValueError(f"{path}: key {key!r} is in both {source[key]!r} and {shard!r}")
            source[key] = shard
            out[key] = value
    wrong = sorted(k for k, shard in weight_map.items() if source.get(k) != shard)
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} keys are not in the shard the index names: {wrong[:10]}"
        )
    return out


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles); a damaged file raises a ValueError naming `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except MemoryError:
        raise
    except Exception as err:
        # Why broad: numpy surfaces a damaged zip as BadZipFile, ValueError, EOFError, OSError,
        # zlib.error or even tokenize.TokenError; each one means "this file is damaged".
        raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from err


def sha256_of_file(path: str) -> str:
    """Hex SHA-256 of the file at `path` (read in 16 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

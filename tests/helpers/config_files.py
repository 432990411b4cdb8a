"""Load a `configs/<name>.py` file of this repository, as `--config=configs/<name>.py:<variant>` does."""

import os

import ml_collections

from gmflow_jax.config_variant import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root."""


def load_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
    """`get_config(variant)` of `configs/<name>.py`."""
    return load_config_file(os.path.join(REPO, "configs", f"{name}.py"), variant)

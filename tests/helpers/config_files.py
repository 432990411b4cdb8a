"""Load a `configs/<name>.py` file of this repository, as `--config=configs/<name>.py:<variant>` does."""

import importlib.util
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root."""


def load_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
    """`get_config(variant)` of `configs/<name>.py`."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_config", os.path.join(REPO, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)

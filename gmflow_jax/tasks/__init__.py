"""Training tasks: what `train.loop.train_and_evaluate` needs to know about one data set.

A task bundles the data-set specific parts of a run, chosen by `config.data.name`:

==================  ===================================================================  =========
`config.data.name`  task                                                                 module
==================  ===================================================================  =========
"checkerboard"      2-D checkerboard, toy MLP, histogram metrics (spec §4.8, §4.9, §7)   `checkerboard`
"digits"            scikit-learn 8x8 / 16x16 digits, class-conditional GM-DiT (issue 4)   `digits`
"imagenet_latents"  prepared ImageNet-256 VAE latents (or a synthetic stand-in), GM-DiT   `imagenet`
==================  ===================================================================  =========

The loop stays generic: it builds the model with `task.build_model`, gets the network seams from
`task.seams`, reads batches from `task.batches`, and hands the EMA parameters to `task.evaluate`.
Task modules are imported lazily, so a run imports only what its data set needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import ml_collections
from flax import nnx

Array = jax.Array

TASKS = {
    "checkerboard": "gmflow_jax.tasks.checkerboard:CheckerboardTask",
    "digits": "gmflow_jax.tasks.digits:DigitsTask",
    "imagenet_latents": "gmflow_jax.tasks.imagenet:ImageNetLatentsTask",
}
"""`config.data.name` -> "module:class" of its task."""


class Task(Protocol):
    """The data-set specific side of a training run (see the module docstring)."""

    def build_model(self, key: Array) -> nnx.Module:
        """The freshly initialized network (parameters from `key`)."""
        ...

    def seams(self, model: nnx.Module) -> tuple[Callable[..., Any], Callable[..., Array] | None]:
        """(denoiser seam, spectrum seam or None) of a concrete or abstract `build_model` result."""
        ...

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        """Training batches `{"x0": [B,H,W,C], "labels": [B] (optional)}` from step `start_step` on."""
        ...

    def prepare_workdir(self, workdir: str) -> None:
        """Write task files a run needs before training (e.g. the pipeline's config.json)."""
        ...

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        train_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Evaluate the EMA parameters; write metrics.json and figures; return the payload."""
        ...


def make_task(config: ml_collections.ConfigDict) -> Task:
    """The task of `config.data.name` (its data are opened here, so missing data fail early)."""
    name = config.data.name
    if name not in TASKS:
        raise ValueError(f"config.data.name must be one of {sorted(TASKS)}, got {name!r}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)

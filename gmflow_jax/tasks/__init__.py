"""Tasks: the data-set specific side of a run, chosen by `config.data.name` (`train.task.Task`).

==================  ===================================================================  ===========
`config.data.name`  task                                                                 module
==================  ===================================================================  ===========
"checkerboard"      2-D checkerboard points, histogram metrics (§4.8, §4.9, §7)          `checkerboard`
"digits"            scikit-learn 8x8 / 16x16 digits, class-conditional, classifier eval  `digits`
"imagenet_latents"  prepared ImageNet-256 VAE latents (or a synthetic stand-in)          `imagenet`
==================  ===================================================================  ===========

A task owns its data and its evaluation; it has no loop of its own. The network comes from
`config.model` through `models.builder` (in the loop), and the task receives the run's keys.
"""

from __future__ import annotations

import jax
import ml_collections

from gmflow_jax.tasks.checkerboard import CheckerboardTask
from gmflow_jax.tasks.checkerboard_classes import CheckerboardClassesTask
from gmflow_jax.tasks.digits import DigitsTask
from gmflow_jax.tasks.imagenet import ImageNetLatentsTask
from gmflow_jax.train.task import Task

TASKS = {
    "checkerboard": CheckerboardTask,
    "checkerboard_classes": CheckerboardClassesTask,
    "digits": DigitsTask,
    "imagenet_latents": ImageNetLatentsTask,
}
"""`config.data.name` -> its task class `(config, keys)`."""


def make_task(config: ml_collections.ConfigDict, keys: dict[str, jax.Array]) -> Task:
    """The task of `config.data.name` (its data are opened here, so missing data fail early)."""
    name = config.data.name
    if name not in TASKS:
        raise ValueError(f"config.data.name must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](config, keys)

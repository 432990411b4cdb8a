"""The class-conditional checkerboard run (`configs/checkerboard.py:tiny_classes`, issue 16): the loop
trains the label table from the task's labeled batches, and the task's evaluation writes the guidance
sweep (metrics.json, PNG) with the exact-sample floor.
"""

import json
import os

import numpy as np
from flax import nnx
from helpers.config_files import load_config

from gmflow_jax.eval.guidance_checkerboard_sweep import guidance_settings
from gmflow_jax.models.builder import build_model
from gmflow_jax.tasks import make_task
from gmflow_jax.train import loop
from gmflow_jax.train.task import run_keys


def test_classes_run_trains_the_label_table_and_writes_the_guidance_sweep(tmp_path):
    config = load_config("checkerboard", "tiny_classes")
    keys = run_keys(config.seed)
    task = make_task(config, keys)
    graphdef, state, _ = loop.train(config, str(tmp_path), task, keys)

    # The labels of the task's batches reach the network: its label table moved from the init.
    init = nnx.state(build_model(config.model, keys["init"]))
    trained = nnx.merge(graphdef, state.params)
    before = np.asarray(init["label_embed"]["embedding"].value)
    after = np.asarray(trained.label_embed.embedding.value)
    assert after.shape == (9, config.model.embed_dim)
    assert not np.allclose(before[:8], after[:8])  # the class rows (not only the null row 8)
    assert not np.allclose(before[8], after[8])  # and the null row: labels were dropped too

    payload = task.evaluate(str(tmp_path), graphdef, state.ema_params, {})
    with open(os.path.join(tmp_path, config.eval.metrics_file)) as f:
        stored = json.load(f)
    settings = guidance_settings(config, mean_only=False)
    assert len(stored["results"]) == len(settings) == len(payload["results"])
    assert stored["exact_sample_floor"]["precision"] == 1.0
    for r in stored["results"]:
        m = r["metrics"]
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["within_cell_tv"] <= 1.0
        assert m["num_samples"] == 8 * config.eval.per_class
        assert r["guided"] == (r["w"] > 0)
    assert os.path.getsize(os.path.join(tmp_path, config.eval.figure_file)) > 0

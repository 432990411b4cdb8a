"""The run-config record: refused changes list every field; allowed ones pass; restart; damage."""

import json
import os

import pytest

from configs import checkerboard, digits
from gmflow_jax.run_config import (
    RUN_CONFIG_FILE,
    RunConfigMismatchError,
    check_run_config,
    restart_requested,
)


def test_first_run_writes_the_full_resolved_config(tmp_path):
    config = digits.get_config("tiny")
    assert check_run_config(config, str(tmp_path), has_checkpoints=False) == []
    record = json.loads((tmp_path / RUN_CONFIG_FILE).read_text())
    assert record["model"]["hidden_size"] == config.model.hidden_size
    assert record["train"]["ema"]["ema_kimg"] == pytest.approx(config.train.ema.ema_kimg)


def test_model_optimizer_and_data_changes_are_refused_with_a_field_by_field_diff(tmp_path):
    check_run_config(checkerboard.get_config("tiny"), str(tmp_path), has_checkpoints=False)
    before = (tmp_path / RUN_CONFIG_FILE).read_text()
    changed = checkerboard.get_config("tiny")
    changed.model.hidden_dim = 64
    changed.train.optimizer.lr = 5e-4
    changed.seed = 7
    changed.train.num_steps = 100  # allowed: it alone would pass
    with pytest.raises(RunConfigMismatchError) as info:
        check_run_config(changed, str(tmp_path), has_checkpoints=True)
    message = str(info.value)
    assert "3 field(s)" in message
    assert "model.hidden_dim: 32 -> 64" in message
    assert (
        "train.optimizer.lr: 0.001 -> 0.0005" in message or "train.optimizer.lr: 0.0002" in message
    )
    assert "seed: 0 -> 7" in message and "num_steps" not in message
    assert (tmp_path / RUN_CONFIG_FILE).read_text() == before  # nothing rewritten


def test_training_length_sampling_and_eval_changes_are_allowed_and_recorded(tmp_path):
    check_run_config(checkerboard.get_config("tiny"), str(tmp_path), has_checkpoints=False)
    changed = checkerboard.get_config("tiny")
    changed.train.num_steps = 50
    changed.eval.num_samples = 1000
    changed.sample.gm_nfes = (4,)
    changed.checkpoint.every_steps = 5
    changes = check_run_config(changed, str(tmp_path), has_checkpoints=True)
    assert {c[0] for c in changes} == {
        "train.num_steps",
        "eval.num_samples",
        "sample.gm_nfes",
        "checkpoint.every_steps",
    }
    assert json.loads((tmp_path / RUN_CONFIG_FILE).read_text())["train"]["num_steps"] == 50


def test_restart_flag_allows_a_changed_config(tmp_path):
    check_run_config(checkerboard.get_config("tiny"), str(tmp_path), has_checkpoints=False)
    changed = checkerboard.get_config("tiny")
    changed.model.hidden_dim = 64
    changed.checkpoint.restart = True
    assert restart_requested(changed)
    check_run_config(changed, str(tmp_path), has_checkpoints=True)
    assert json.loads((tmp_path / RUN_CONFIG_FILE).read_text())["model"]["hidden_dim"] == 64


def test_damaged_record_is_set_aside_and_replaced(tmp_path):
    (tmp_path / RUN_CONFIG_FILE).write_text('{"model": {"hidden')
    check_run_config(checkerboard.get_config("tiny"), str(tmp_path), has_checkpoints=True)
    assert json.loads((tmp_path / RUN_CONFIG_FILE).read_text())["model"]["hidden_dim"] == 32
    assert any(n.startswith(RUN_CONFIG_FILE + ".damaged-") for n in os.listdir(tmp_path))

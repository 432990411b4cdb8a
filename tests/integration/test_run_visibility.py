"""Seeing a run: the profiler trace, the evaluation during training, the config in TensorBoard, and
one compile time, from a tiny checkerboard run of the one training loop (`train.loop.train`)."""

import glob
import io
import json
import math
import os
import time

import numpy as np
import pytest
from helpers.config_files import load_config
from helpers.event_files import summary_values
from PIL import Image

from gmflow_jax.tasks import make_task
from gmflow_jax.tasks.checkerboard import CheckerboardTask, density_image
from gmflow_jax.train import loop
from gmflow_jax.train.task import run_keys


def _visible_config(num_steps=4):
    config = load_config("checkerboard", "tiny")
    config.train.num_steps = num_steps
    config.train.log_every = 2
    config.eval.every_steps = 2
    config.eval.periodic_samples = 512
    config.profile.skip_steps = 1
    config.profile.num_steps = 2
    return config


def _by_tag(values):
    out = {}
    for step, v in values:
        out.setdefault(v.tag, []).append((step, v))
    return out


def test_tiny_run_leaves_a_trace_eval_scalars_a_sample_image_the_config_and_one_compile_time(
    tmp_path, capsys
):
    config = _visible_config()
    keys = run_keys(config.seed)
    task = make_task(config, keys)
    workdir = str(tmp_path / "run")
    graphdef, state, info = loop.train(config, workdir, task, keys)
    out = capsys.readouterr().out

    # profiler: one trace of the chosen steps, in TensorBoard's profile-plugin layout
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0

    tags = _by_tag(summary_values(os.path.join(workdir, "tensorboard")))
    # the evaluation during training ran after steps 2 and 4, on the EMA parameters
    for name in ("in_square_rate", "histogram_tv", "sliced_w1", "coverage"):
        assert [s for s, _ in tags[f"eval/{name}"]] == [2, 4], name
    # the same noise at every call: re-evaluating the final EMA parameters gives the logged step-4
    # values exactly (float32 in the event file)
    again, image = task.evaluate_during_training(workdir, graphdef, state.ema_params, 4)
    for name, value in again.items():
        logged = tags[f"eval/{name}"][-1][1].simple_value
        assert logged == pytest.approx(value, rel=1e-6, abs=1e-7), name
    # the sample image: one per evaluation, the PNG of the density image
    assert [s for s, _ in tags["eval/samples"]] == [2, 4]
    png = tags["eval/samples"][-1][1].image.encoded_image_string
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and image.std() > 0

    # the full resolved config as text, and the hyper-parameters, in the same run
    text = tags["config/text_summary"][0][1].tensor.string_val[0].decode()
    assert '"periodic_samples": 512' in text and '"num_gaussians": 4' in text
    assert any(v.metadata.plugin_data.plugin_name == "hparams" for _, v in sum(tags.values(), []))

    # the compile time: recorded once (scalar, train log, one printed line), out of the rate
    (compile_event,) = tags["train/compile_s"]
    assert compile_event[0] == 1
    (session,) = json.loads((tmp_path / "run" / "train_log.json").read_text())["sessions"]
    assert session["compile_s"] == pytest.approx(compile_event[1].simple_value, rel=1e-6)
    assert session["compile_s"] == info["compile_s"] > 0
    assert out.count("compiled in ") == 1
    assert session["it_per_s"] == info["it_per_s"] > 0 and math.isfinite(session["final_loss"])
    assert "mfu" not in session  # MFU is reported for GM-DiT runs only
    # one progress line per logging step (2 and 4), each on the global step axis
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("steps/s" in line and "img/s" in line and "ETA" in line for line in lines)
    # the rate counts from the end of step 1 (the compiling one): known at steps 2 and 4
    assert [s for s, _ in tags["train/steps_per_s"]] == [2, 4]


class _SlowEvalTask(CheckerboardTask):
    """The checkerboard task whose evaluation during training takes `delay` more seconds."""

    delay = 0.5

    def evaluate_during_training(self, workdir, graphdef, ema_params, step):
        time.sleep(self.delay)
        return super().evaluate_during_training(workdir, graphdef, ema_params, step)


def test_evaluation_during_training_is_kept_out_of_the_step_rate(tmp_path):
    # 6 steps with an evaluation after each one that sleeps 0.5 s: counted, the rate would be below
    # 5 steps / (5 x 0.5 s) = 2 steps/s; a tiny step takes milliseconds.
    config = load_config("checkerboard", "tiny")
    config.train.num_steps = 6
    config.train.log_every = 6
    config.eval.every_steps = 1
    config.eval.periodic_samples = 64
    keys = run_keys(config.seed)
    _, _, info = loop.train(config, str(tmp_path), _SlowEvalTask(config, keys), keys)
    assert info["it_per_s"] > 4 * 2.0


def test_bad_every_steps_and_profile_fields_are_named_before_training(tmp_path):
    config = load_config("checkerboard", "tiny")
    config.eval.every_steps = -1
    keys = run_keys(config.seed)
    with pytest.raises(ValueError, match=r"config.eval.every_steps must be an int >= 0.*-1"):
        loop.train(config, str(tmp_path), make_task(config, keys), keys)
    config = load_config("checkerboard", "tiny")
    config.profile.steps = 3
    with pytest.raises(ValueError, match=r"config.profile has unknown fields \['steps'\]"):
        loop.train(config, str(tmp_path), make_task(config, keys), keys)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_the_density_image_shows_where_the_points_are():
    # Oracle: points at the centre of bin (x bin 40, y bin 9) light up exactly that bin, drawn
    # 4x4 pixels large, with y up (y bin 9 of 64 is image row 63 - 9).
    width = 8.4 / 64
    points = np.tile([[-4.2 + 40.5 * width, -4.2 + 9.5 * width]], (1000, 1))
    image = density_image(points)
    lit = np.argwhere((image != image[0, 0]).any(axis=-1))
    assert {(r // 4, c // 4) for r, c in lit} == {(63 - 9, 40)}
    assert len(lit) == 16

"""`validate_config`: every shipped config passes; each of 60+ bad values gets a one-line
`ConfigError` naming its field and value; an unknown override field gets one line, exit 2."""

import os
import subprocess
import sys

import pytest

from configs import checkerboard, digits, imagenet256
from gmflow_jax.config_validation import ConfigError, validate_config

CONFIGS = {"checkerboard": checkerboard, "digits": digits, "imagenet": imagenet256}

VARIANTS = (
    [("checkerboard", v) for v in ("", "baseline", "full", "tiny", "tiny_baseline")]
    + [("digits", v) for v in ("", "baseline", "tiny", "tiny_baseline")]
    + [("imagenet", "tiny")]
)


def _config(name, variant=""):
    config = CONFIGS[name].get_config(variant)
    if name == "imagenet" and variant == "":
        config.data.path = "/prepared/latents"
    return config


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_shipped_configs_are_valid(name, variant):
    validate_config(_config(name, variant))


# (config, field, bad value, field named in the error). The error must name the field itself,
# or the field the rule ties it to.
BAD = [
    ("checkerboard", "seed", -1, "seed"),
    ("checkerboard", "model.name", "mlp", "model.name"),
    ("checkerboard", "model.name", "gm_dit", "model.name"),
    ("checkerboard", "model.num_gaussians", 0, "model.num_gaussians"),
    ("checkerboard", "model.embed_dim", -4, "model.embed_dim"),
    ("checkerboard", "model.hidden_dim", 0, "model.hidden_dim"),
    ("checkerboard", "model.num_layers", 0, "model.num_layers"),
    ("checkerboard", "model.pos_min_period", 0.0, "model.pos_min_period"),
    ("checkerboard", "model.pos_max_period", 1e-3, "model.pos_max_period"),
    ("checkerboard", "data.name", "mnist", "data.name"),
    ("checkerboard", "train.num_steps", -10, "train.num_steps"),
    ("checkerboard", "train.num_steps", 0, "train.num_steps"),
    ("checkerboard", "train.batch_size", 0, "train.batch_size"),
    ("checkerboard", "train.trans_ratio", 0.0, "train.trans_ratio"),
    ("checkerboard", "train.trans_ratio", 1.5, "train.trans_ratio"),
    ("checkerboard", "train.weight_scale", -1.0, "train.weight_scale"),
    ("checkerboard", "train.t_sampler", "cosine", "train.t_sampler"),
    ("checkerboard", "train.logit_normal_std", 0.0, "train.logit_normal_std"),
    ("checkerboard", "train.shift", 0.0, "train.shift"),
    ("checkerboard", "train.log_every", 0, "train.log_every"),
    ("checkerboard", "train.max_consecutive_skips", 0, "train.max_consecutive_skips"),
    ("checkerboard", "train.optimizer.lr", 1e39, "train.optimizer.lr"),
    ("checkerboard", "train.optimizer.lr", 0.0, "train.optimizer.lr"),
    ("checkerboard", "train.optimizer.lr", float("nan"), "train.optimizer.lr"),
    ("checkerboard", "train.optimizer.b1", 1.0, "train.optimizer.b1"),
    ("checkerboard", "train.optimizer.b2", -0.1, "train.optimizer.b2"),
    ("checkerboard", "train.optimizer.eps", -1.0, "train.optimizer.eps"),
    ("checkerboard", "train.optimizer.weight_decay", -0.01, "train.optimizer.weight_decay"),
    ("checkerboard", "train.optimizer.warmup_iters", -1, "train.optimizer.warmup_iters"),
    ("checkerboard", "train.optimizer.warmup_ratio", 0.0, "train.optimizer.warmup_ratio"),
    ("checkerboard", "train.optimizer.grad_clip_norm", -1.0, "train.optimizer.grad_clip_norm"),
    ("checkerboard", "train.optimizer.clip_begin", -5, "train.optimizer.clip_begin"),
    ("checkerboard", "train.ema.policy", "polyak", "train.ema.policy"),
    ("checkerboard", "train.ema.gamma", -1.0, "train.ema.gamma"),
    ("checkerboard", "train.ema.beta", 1.5, "train.ema.beta"),
    ("checkerboard", "train.ema.eps", 0.0, "train.ema.eps"),
    ("checkerboard", "sample.gm_solvers", ("gm_sdf",), "sample.gm_solvers[0]"),
    ("checkerboard", "sample.gm_solvers", ("gm_sde", "euler"), "sample.gm_solvers[1]"),
    ("checkerboard", "sample.gm_solvers", (), "sample.gm_solvers"),
    ("checkerboard", "sample.gm_nfes", (1, 0), "sample.gm_nfes[1]"),
    ("checkerboard", "sample.baseline_solvers", ("euler", "heun"), "sample.baseline_solvers[1]"),
    ("checkerboard", "sample.baseline_nfes", (-2,), "sample.baseline_nfes[0]"),
    ("checkerboard", "sample.gm_ode_substeps_total", 0, "sample.gm_ode_substeps_total"),
    ("checkerboard", "sample.shift", -1.0, "sample.shift"),
    ("checkerboard", "sample.batch_size", 0, "sample.batch_size"),
    ("checkerboard", "eval.num_samples", 0, "eval.num_samples"),
    ("checkerboard", "eval.metrics_file", "", "eval.metrics_file"),
    ("checkerboard", "eval.figure_file", "a/b.png", "eval.figure_file"),
    ("checkerboard", "checkpoint.every_steps", 0, "checkpoint.every_steps"),
    ("checkerboard", "checkpoint.max_to_keep", 0, "checkpoint.max_to_keep"),
    ("checkerboard", "checkpoint.restore_from", "/no/such/run", "checkpoint.restore_from"),
    ("digits", "data.image_size", 12, "data.image_size"),
    ("digits", "model.sample_size", 16, "model.sample_size"),
    ("digits", "model.num_heads", 3, "model.num_heads"),
    ("digits", "model.patch_size", 3, "model.patch_size"),
    ("digits", "model.num_classes", 9, "model.num_classes"),
    ("digits", "model.in_channels", 3, "model.spectrum_net.base_size"),  # names both
    ("digits", "model.dtype", "float64", "model.dtype"),
    ("digits", "model.mlp_ratio", 0, "model.mlp_ratio"),
    ("digits", "model.spectrum_net.base_size", (1, 8), "model.spectrum_net.base_size"),
    ("digits", "model.spectrum_net.layers", (64, 0), "model.spectrum_net.layers[1]"),
    ("digits", "train.prob_class", 1.1, "train.prob_class"),
    ("digits", "train.spectral_loss_weight", -1.0, "train.spectral_loss_weight"),
    ("digits", "train.ema.ema_kimg", 0.0, "train.ema.ema_kimg"),
    ("digits", "train.ema.ema_rampup", -0.05, "train.ema.ema_rampup"),
    ("digits", "sample.gm_solvers", ("gm_sde_3",), "sample.gm_solvers[0]"),
    ("digits", "sample.gm_solvers", ("gm_ode_nospec",), "sample.gm_solvers[0]"),
    ("digits", "sample.guidance_scales", (0.0, 1.0), "sample.guidance_scales[1]"),
    ("digits", "sample.guidance_scales", (-0.1,), "sample.guidance_scales[0]"),
    ("digits", "sample.cfg_scales", (-1.0,), "sample.cfg_scales[0]"),
    ("digits", "sample.orthogonal_guidance", 2.0, "sample.orthogonal_guidance"),
    ("digits", "eval.per_class", 0, "eval.per_class"),
    ("digits", "eval.grid_per_class", 1000, "eval.grid_per_class"),
    ("digits", "eval.classifier_seed", -1, "eval.classifier_seed"),
    ("imagenet", "model.remat_policy", "some", "model.remat_policy"),
    ("imagenet", "data.source", "web", "data.source"),
    ("imagenet", "data.path", "", "data.path"),
    ("imagenet", "data.num_synthetic", 0, "data.num_synthetic"),
    ("imagenet", "eval.save_samples", 10**6, "eval.save_samples"),
    ("imagenet", "eval.samples_file", "..", "eval.samples_file"),
    ("imagenet", "mesh.fsdp", 0, "mesh.fsdp"),
    ("imagenet", "mesh.data", -1, "mesh"),  # fsdp is -1 already: two -1 axes
    ("imagenet", "mesh.tensor", -3, "mesh.tensor"),
    ("imagenet", "mesh.dcn_data", 0, "mesh.dcn_data"),
    ("imagenet", "mesh.rules", (("embed", "model"),), "mesh.rules[0]"),
    ("imagenet", "distributed.num_processes", 0, "distributed.num_processes"),
    ("imagenet", "distributed.process_id", 1, "distributed.process_id"),
]


def _set(config, field, value):
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    # Why not setattr: ConfigDict type-checks assignments; a bad value of another type (a str
    # where a float was) is what a hand-edited config file could hold.
    with node.ignore_type():
        node[leaf] = value


def test_at_least_sixty_bad_values():
    assert len(BAD) >= 60


@pytest.mark.parametrize("name,field,value,named", BAD, ids=lambda x: str(x))
def test_bad_value_is_refused_naming_field_and_value(name, field, value, named):
    variant = "tiny" if name == "imagenet" and field.startswith("data.") else ""
    config = _config(name, variant if name == "imagenet" else "")
    if name == "imagenet" and field == "data.path":
        config.data.source = "files"
    _set(config, field, value)
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert "\n" not in message
    assert f"config.{named}=" in message, message
    assert " is invalid: " in message


def test_derived_ema_fields_follow_an_override():
    config = digits.get_config("tiny")
    config.train.batch_size = 32
    config.train.num_steps = 6
    assert config.train.ema.batch_size == 32
    assert config.train.ema.ema_kimg == pytest.approx(30000.0 * (6 * 32 / 1000) / 819200)
    board = checkerboard.get_config("")
    board.train.batch_size = 256
    assert board.train.ema.batch_size == 256


def test_unknown_override_field_is_one_line_without_traceback(tmp_path):
    script = (
        "from absl import app\n"
        "from ml_collections import config_flags\n"
        "from gmflow_jax.config_validation import parse_flags\n"
        "C = config_flags.DEFINE_config_file('config', None, 'c', lock_config=True)\n"
        "app.run(lambda argv: print('RAN'), flags_parser=parse_flags)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "--config=configs/checkerboard.py:tiny",
            "--config.train.foo=1",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert out.returncode == 2 and "RAN" not in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "config.train.foo" in lines[0] and "num_steps" in lines[0]

"""Tests of tools/sample.py, gmflow_jax.eval.adm_export (sharded, resumable 50k sampling) and
gmflow_jax.eval.guidance_sweep (sweep tables).

A tiny random GM-DiT (2 blocks, width 64, 8x8x4 latents, K = 2, 1000 classes) with a SpectrumMLP is
saved as one of our training checkpoints (orbax TrainState + config.json pointing at a tiny random
VAE in the run folder, 16x16 images), built from the tiny official folder of `helpers.official_layout`. The base run samples 20 images
with GM-SDE 2 (spectral sampling, guidance 0.3, 2 steps) on the 8 fake CPU devices in global batches
of 16 (2 per device); the other runs are compared with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from helpers.official_layout import write_tiny_official_folder
from scipy import stats

from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.eval import adm_export, guidance_sweep
from gmflow_jax.interop.converted_folder import load_official, load_vae_folder
from gmflow_jax.models.builder import gm_dit_config_to_dict
from gmflow_jax.models.image_denoiser import ImageDenoiser
from gmflow_jax.sampling.streams import sample_labels
from gmflow_jax.train.state import init_train_state

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "sample.py"

SEED = 7
NUM_SAMPLES = 20
# Cheap XLA CPU compiles (about 4x faster for this program; every run here uses the same option).
FAST_COMPILE = ["--xla_option", "xla_backend_optimization_level=0"]
RUN_ARGS = [
    "--num_samples", str(NUM_SAMPLES), "--solver", "gm_sde_2", "--num_steps", "2",
    "--guidance_scale", "0.3", "--seed", str(SEED), "--save_latents", *FAST_COMPILE,
]  # fmt: skip


def _load_tool():
    """Import tools/sample.py as a module."""
    spec = importlib.util.spec_from_file_location("sample_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    """A training workdir: checkpoints/ (step 3, EMA = 0.9 x the random weights) and config.json."""
    root = tmp_path_factory.mktemp("sample_tool")
    official_dir = write_tiny_official_folder(root / "official")
    models = load_official(str(official_dir), scan_blocks=True, with_vae=False)
    module = ImageDenoiser(models.transformer, models.spectrum_net)  # the training module
    _, state = init_train_state(module, optax.adamw(1e-3), jax.random.PRNGKey(0))
    state = state.replace(ema_params=jax.tree.map(lambda a: 0.9 * a, state.params))
    work = root / "run"
    with Checkpointer(work / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, state, force=True)
    # The VAE ships inside the run folder (a config's `vae` may not leave its folder).
    shutil.copytree(official_dir / "vae", work / "vae")
    config = {
        "model": gm_dit_config_to_dict(models.transformer.config),
        "spectrum_net": {"base_size": [4, 8, 8], "layers": [16, 8]},
        "vae": "vae",
    }
    (work / "config.json").write_text(json.dumps(config))
    return work


def _run(workdir, out_dir, *extra) -> int:
    """tools/sample.py main() in this process (8 devices)."""
    return _load_tool().main(["--checkpoint", str(workdir), "--out_dir", str(out_dir), *extra])


def _shards(out_dir) -> list[pathlib.Path]:
    """The shard files of a run, by start index."""
    return sorted(pathlib.Path(out_dir).glob(f"{adm_export.SHARD_PREFIX}*.npz"))


def _load(out_dir) -> dict[str, np.ndarray]:
    """Merged images and labels, and the shards' latents, of a run."""
    with np.load(pathlib.Path(out_dir) / adm_export.MERGED_NAME) as data:
        out = {"images": data["arr_0"], "labels": data["arr_1"]}
    latents = []
    for path in _shards(out_dir):
        with np.load(path) as data:
            latents.append(data["arr_2"])
    out["latents"] = np.concatenate(latents)
    return out


def _arrays(path) -> dict[str, np.ndarray]:
    """Every array of an .npz file."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same keys and bit-identical arrays."""
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def one_device_run(workdir, tmp_path_factory):
    """The same run in a 1-device process with global batch 2, started now (it compiles while the
    in-process base run does); returns (process, out_dir)."""
    out = tmp_path_factory.mktemp("one_device")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, str(TOOL), "--checkpoint", str(workdir), "--out_dir", str(out)]
    proc = subprocess.Popen(
        [*cmd, *RUN_ARGS, "--batch_size", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def base_run(workdir, one_device_run, tmp_path_factory) -> pathlib.Path:
    """20 samples on 8 devices, global batch 16 (2 per device): shards [0, 16) and [16, 20)."""
    out = tmp_path_factory.mktemp("base")
    assert _run(workdir, out, *RUN_ARGS, "--batch_size", "16") == 0
    return out


# ----------------------------------------------------------------------------------------------
# Samples do not depend on the device count or the batch size
# ----------------------------------------------------------------------------------------------


def test_run_writes_shards_merge_and_manifest(base_run):
    """Shards tile [0, 20); samples.npz = their concatenation; labels follow the index streams."""
    assert [p.name for p in _shards(base_run)] == [
        "shard_00000000_00000016.npz",
        "shard_00000016_00000020.npz",
    ]
    got = _load(base_run)
    assert got["images"].shape == (NUM_SAMPLES, 16, 16, 3) and got["images"].dtype == np.uint8
    assert got["labels"].dtype == np.int64 and got["latents"].shape == (NUM_SAMPLES, 8, 8, 4)
    parts = []
    for path in _shards(base_run):
        with np.load(path) as data:
            parts.append(data["arr_0"])
            assert set(data.files) == {"arr_0", "arr_1", "arr_2"}
    np.testing.assert_array_equal(np.concatenate(parts), got["images"])
    np.testing.assert_array_equal(got["labels"], sample_labels(SEED, np.arange(NUM_SAMPLES), 1000))
    # Distinct samples, and no two indices share noise.
    assert len({img.tobytes() for img in got["images"]}) == NUM_SAMPLES
    assert len(np.unique(got["images"])) > 50
    manifest = json.loads((base_run / adm_export.MANIFEST_NAME).read_text())
    assert manifest["guidance_scale"] == 0.3 and manifest["seed"] == SEED
    assert manifest["solver_config"]["solver"] == "gm_sde" and manifest["solver_config"]["spectral"]


def test_one_device_and_batch_2_give_the_same_samples_as_eight_devices_and_batch_16(
    base_run, one_device_run
):
    """A 1-device process with global batch 2 (10 batches) writes bit-identical samples.

    Both the device count (8 -> 1) and the global batch (16 -> 2, so each index sits in another
    batch at another row) change; the per-device batch (2) is the same, so XLA computes each row
    with the same kernels and equality is exact. (A different per-device batch changes the float
    rounding of the network's matmuls: about 1e-4 on these latents after 2 GM-SDE steps.)
    """
    proc, out = one_device_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "in 10 batches of 2 on 1 devices / 1 processes" in stdout
    assert len(_shards(out)) == 10
    one, eight = _load(out), _load(base_run)
    for key in ("images", "labels", "latents"):
        np.testing.assert_array_equal(one[key], eight[key], err_msg=key)
    assert (out / adm_export.MANIFEST_NAME).read_text() == (
        base_run / adm_export.MANIFEST_NAME
    ).read_text()


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def test_resume_regenerates_only_the_damaged_shard(base_run, workdir, tmp_path, capsys):
    """A truncated shard is regenerated identically; the complete one is left untouched."""
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    first, last = _shards(out)
    base_arrays = _arrays(first)
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # no longer opens
    untouched = last.stat()
    capsys.readouterr()
    assert _run(workdir, out, *RUN_ARGS, "--batch_size", "16") == 0
    assert "1 batches to run" in capsys.readouterr().out
    assert last.stat().st_mtime_ns == untouched.st_mtime_ns
    assert last.stat().st_ino == untouched.st_ino
    _assert_same(_arrays(first), base_arrays)
    for key, value in _load(base_run).items():
        np.testing.assert_array_equal(_load(out)[key], value, err_msg=key)


def test_missing_or_mismatched_shards_count_as_not_done(base_run, tmp_path):
    """A missing file, other labels (another seed), another size or no latents: not accepted."""
    shard = _shards(base_run)[1]
    with np.load(shard) as data:
        arrays = {k: data[k] for k in data.files}
    labels = sample_labels(SEED, np.arange(16, 20), 1000)
    ok = adm_export.read_shard(str(shard), 4, (16, 16, 3), labels, True)
    assert ok is not None
    np.savez(tmp_path / "bad.npz", arrays["arr_0"], (arrays["arr_1"] + 1) % 1000, arrays["arr_2"])
    assert adm_export.read_shard(str(tmp_path / "bad.npz"), 4, (16, 16, 3), labels, True) is None
    assert adm_export.read_shard(str(shard), 5, (16, 16, 3), labels, True) is None
    assert adm_export.read_shard(str(tmp_path / "none.npz"), 4, (16, 16, 3), labels, True) is None
    np.savez(tmp_path / "no_latents.npz", arrays["arr_0"], arrays["arr_1"])
    assert (
        adm_export.read_shard(str(tmp_path / "no_latents.npz"), 4, (16, 16, 3), labels, True)
        is None
    )
    assert adm_export.read_shard(str(tmp_path / "no_latents.npz"), 4, (16, 16, 3), labels, False)


def test_rerun_with_other_settings_is_refused(base_run, workdir, tmp_path, capsys):
    """Another guidance scale in the same out_dir fails naming the setting; nothing is written."""
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = [a if a != "0.3" else "0.31" for a in RUN_ARGS]
    assert _run(workdir, out, *args, "--batch_size", "16") == 1
    assert "guidance_scale: 0.3 there, 0.31 now" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# Random streams, uint8, layout
# ----------------------------------------------------------------------------------------------


def test_labels_are_uniform_and_seeded_by_index():
    """Chi-square of 20,000 labels over 10 classes is within both 1e-6 tails; chunks agree."""
    n, k = 20_000, 10
    labels = sample_labels(3, np.arange(n), k)
    counts = np.bincount(labels, minlength=k)
    chi2 = float(np.sum((counts - n / k) ** 2 / (n / k)))
    assert stats.chi2.ppf(1e-6, k - 1) < chi2 < stats.chi2.isf(1e-6, k - 1)
    np.testing.assert_array_equal(
        np.concatenate(
            [
                sample_labels(3, np.arange(0, 7000), k),
                sample_labels(3, np.arange(7000, n), k),
            ]
        ),
        labels,
    )
    # Neighbouring indices are independent (lag-1 pairs uniform over k^2 cells), seeds differ.
    pairs = np.bincount(labels[:-1] * k + labels[1:], minlength=k * k)
    chi2_pairs = float(np.sum((pairs - (n - 1) / k**2) ** 2 / ((n - 1) / k**2)))
    assert chi2_pairs < stats.chi2.isf(1e-6, k * k - 1)
    assert np.mean(sample_labels(4, np.arange(n), k) == labels) < 0.2


def test_uint8_conversion_matches_adm_truncation_and_rounding():
    """adm: u for x in ((u + f) / 127.5 - 1), f in (0, 1); round: nearest; clipping; NaN -> 0."""
    u = np.arange(256)
    for f, rounded in (
        (0.2, u),
        (0.45, u),
        (0.55, np.minimum(u + 1, 255)),
        (0.9, np.minimum(u + 1, 255)),
    ):
        x = ((u + f) / 127.5 - 1.0).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(adm_export.images_to_uint8(x, "adm")), u)
        np.testing.assert_array_equal(np.asarray(adm_export.images_to_uint8(x, "round")), rounded)
    edges = np.array([-1.0, 1.0, -3.0, 2.5, 0.0, np.nan], np.float32)
    np.testing.assert_array_equal(
        np.asarray(adm_export.images_to_uint8(edges, "adm")), [0, 255, 0, 255, 127, 0]
    )
    with pytest.raises(ValueError, match="uint8 mode 'floor' is unknown; allowed: adm, round"):
        adm_export.images_to_uint8(edges, "floor")


def test_run_images_are_adm_uint8_of_the_vae_decode_of_its_latents(base_run, workdir):
    """The written images are ADM's truncating uint8 of the VAE decode of the written latents."""
    config = json.loads((workdir / "config.json").read_text())
    vae = load_vae_folder(str(workdir / config["vae"]))
    got = _load(base_run)
    decoded = np.asarray(jax.jit(lambda z: vae.decode(z))(got["latents"]), np.float64)
    oracle = np.floor(np.clip((decoded + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
    diff = np.abs(oracle.astype(int) - got["images"].astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    rounded = np.floor(np.clip((decoded + 1.0) * 127.5 + 0.5, 0.0, 255.0))
    assert np.mean(rounded != got["images"]) > 0.2  # the rounding convention would differ


def test_shard_plan_tiles_the_indices_for_any_process_layout():
    """Two processes holding rows [0, 4) and [4, 8) of each batch of 8: 13 samples in 4 shards."""
    plan = adm_export.shard_plan(13, 8, {1: (4, 8), 0: (0, 4)})
    assert [(s.batch, s.process, s.start, s.stop) for s in plan] == [
        (0, 0, 0, 4),
        (0, 1, 4, 8),
        (1, 0, 8, 12),
        (1, 1, 12, 13),
    ]
    assert plan[3].name == "shard_00000012_00000013.npz"
    plan = adm_export.shard_plan(16, 8, {0: (0, 4), 1: (4, 8)})
    assert [s.size for s in plan] == [4, 4, 4, 4]


# ----------------------------------------------------------------------------------------------
# Sweep tables (pure)
# ----------------------------------------------------------------------------------------------


def _row(solver, steps, w, fid, precision, recall=0.5, n=1000, substeps=16):
    """One sweep result row."""
    return {
        "solver": solver,
        "num_steps": steps,
        "num_substeps": substeps,
        "guidance_scale": w,
        "num_samples": n,
        "seed": 0,
        "fid": fid,
        "inception_score": 100.0 + 100 * w,
        "inception_score_std": 1.0,
        "precision": precision,
        "recall": recall,
        "saturation": 0.3,
        "saturation_rel": 0.3 - 0.318,
    }


def test_best_settings_pick_lowest_fid_and_highest_precision_per_solver_and_nfe(tmp_path):
    """Per (solver, NFE, substeps, N): min FID and max precision, NaN skipped, ties -> smaller w."""
    results = [
        _row("gm_ode2", 8, 0.02, 9.0, 0.70),
        _row("gm_ode2", 8, 0.11, 3.1, 0.80),
        _row("gm_ode2", 8, 0.47, 8.0, 0.93),
        _row("gm_ode2", 8, 0.39, 7.0, 0.93),  # ties 0.47 on precision: the smaller w wins
        # NaN FID: left out of the FID choice, kept for precision.
        _row("gm_ode2", 8, 0.09, float("nan"), 0.99),
        _row("gm_ode2", 32, 0.05, 2.2, 0.75, substeps=4),
        _row("gm_ode2", 32, 0.75, 12.0, 0.95, substeps=4),
        _row("gm_sde2", 8, 0.13, 3.4, 0.90, substeps=1),
        _row("gm_ode2", 8, 0.11, 2.0, 0.60, n=5000),  # another N: its own group
    ]
    table = guidance_sweep.best_settings(results)
    summary = [
        (
            r["solver"],
            r["num_steps"],
            r["num_samples"],
            r["best_fid"]["guidance_scale"],
            r["best_precision"]["guidance_scale"],
            r["num_settings"],
        )
        for r in table
    ]
    assert summary == [
        ("gm_ode2", 8, 1000, 0.11, 0.09, 5),
        ("gm_ode2", 8, 5000, 0.11, 0.11, 1),
        ("gm_ode2", 32, 1000, 0.05, 0.75, 2),
        ("gm_sde2", 8, 1000, 0.13, 0.13, 1),
    ]
    results[4]["precision"] = float("nan")
    assert guidance_sweep.best_settings(results)[0]["best_precision"]["guidance_scale"] == 0.39
    md = guidance_sweep.sweep_table_markdown(guidance_sweep.best_settings(results))
    line = next(line for line in md.splitlines() if line.startswith("| gm_ode2 | 8 | 16 | 1000"))
    assert "| 0.11 | 3.10 | 111.0 | 0.800 | 0.500 | 0.39 | 0.930 | 0.500 | 7.00 | -0.018 |" in line
    written = guidance_sweep.write_sweep_tables(str(tmp_path), results)
    assert json.loads((tmp_path / guidance_sweep.TABLE_JSON_NAME).read_text()) == json.loads(
        json.dumps(written)
    )
    assert (tmp_path / guidance_sweep.TABLE_MD_NAME).read_text() == md


def test_paper_guidance_grid_and_sweep_defaults():
    """The sweep grid is the paper's 20 probabilistic scales; NFE 8 and 32; GM-ODE 2 and GM-SDE 2."""
    grid = guidance_sweep.PAPER_GUIDANCE_GRID
    assert len(grid) == 20 and grid[0] == 0.02 and grid[-1] == 0.75 and list(grid) == sorted(grid)
    assert {0.09, 0.11, 0.39, 0.47}.issubset(grid)
    assert guidance_sweep.PAPER_SWEEP_STEPS == (8, 32)
    assert guidance_sweep.PAPER_SWEEP_SOLVERS == ("gm_ode_2", "gm_sde_2")


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--guidance_scale", "-0.5"], r"--guidance_scale=-0.5 must be >= 0 \(GM rows: \[0, 1\)"),
        (
            ["--solver", "gm_sde3"],
            r"argument --solver: unknown sampler 'gm_sde3'; did you mean 'gm_sde'\? Allowed:",
        ),
        (["--batch_size", "12"], "--batch_size=12 must be divisible by the 8 data-parallel"),
        (["--num_samples", "0"], "--num_samples=0 must be >= 1"),
        (["--mesh", "data=x"], r"--mesh='data=x': data='x' must be an integer"),
        (["--mesh", "pipeline=2"], "key one of data, fsdp, tensor, dcn_data, dcn_fsdp"),
        (["--mesh", "data=3"], "must equal the 8 devices per slice"),
        (["--solver", "gm_sde2", "--num_substeps", "4"], "--num_substeps=4 needs a GM-ODE solver"),
        (["--solver", "euler", "--guidance_scale", "-1"], r"--guidance_scale=-1.0 must be >= 0"),
        (
            ["--solver", "gm_ode_2", "--guidance_scale", "1.5"],
            r"must be in \[0, 1\) for --solver=gm_ode_2 \(probabilistic",
        ),
        (["--step", "-1"], "--step=-1 must be a checkpoint step"),
        (["--sweep"], "--sweep needs --inception"),
        (["--sweep", "--solver", "gm_ode2"], "--solver sets a single run; with --sweep use"),
        (
            ["--sweep", "--sweep_solvers", "gm_ode2,euler"],
            r"\['euler'\] not allowed; allowed: gm_sde, gm_sde_nospec, gm_sde_2, gm_sde_2_nospec",
        ),
        (["--sweep", "--sweep_guidance", "0.1,1.2"], r"must be in \(0, 1\).*\[1.2\]"),
        (
            ["--sweep", "--inception", "missing.npz", "--reference", "x"],
            "--inception='missing.npz' is not a file",
        ),
        (["--config", "c.json", "--official", "."], "not allowed with argument --checkpoint"),
        (["--xla_option", "opt=1"], "--xla_option='opt=1' must be KEY=VALUE with an xla_\\* key"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_the_flag(tmp_path, capsys, extra, match):
    """Bad flags exit with status 2 before any model is loaded, naming flag, value and what is allowed."""
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, tmp_path / "out", *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()

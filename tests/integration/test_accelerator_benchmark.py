"""benchmarks/accelerator.py runs end to end at a tiny size on CPU (not timed) and reports
consistent figures."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from gmflow_jax.models.gm_dit import gm_dit_config
from gmflow_jax.train.flops import gm_dit_train_flops

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_tiny_run_writes_a_consistent_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true",
    }
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--tiny", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 2 and result["model"] == "tiny" and result["fallback"] is None
    train = result["train"]
    assert train["batch"] == 2  # 1 per device
    assert train["images_per_s"] == pytest.approx(train["batch"] / train["step_s"])
    # the tiny imagenet256 model: 2 blocks, width 32, 2 heads, 8x8x4 latents, K = 8
    cfg = gm_dit_config("S/2", num_layers=2, hidden_size=32, num_heads=2, sample_size=8,
                        logstd_inner_dim=16, num_classes=1000)  # fmt: skip
    assert train["flops_per_step"] == gm_dit_train_flops(cfg, 2)
    assert result["peak_source"] == "measured float32 matmul" and result["peak_flops"] > 0
    assert result["mfu"] == pytest.approx(
        train["flops_per_step"] / (train["step_s"] * result["peak_flops"])
    )
    assert [r["sampler"] for r in result["samplers"]] == ["gm_sde_2", "gm_ode_2"]
    for r in result["samplers"]:
        assert r["nfe"] == 8 and r["images_per_s"] == pytest.approx(r["batch"] / r["call_s"])
    assert "| train step | 2 |" in proc.stdout and "| gm_ode_2 NFE 8 | 2 |" in proc.stdout

"""`python -m gmflow_jax.aot`: the real train step and sampler compiled for a TPU topology on this CPU.

The collective parser is checked on a hand-written HLO module whose counts and bytes are worked out by
hand; the compile of a tiny GM-DiT for v5p 2x2x2 is checked against what must hold of any correct
per-chip figures: the donated state is aliased in full, the per-chip arguments cover the state's
shards computed independently from the shardings, an fsdp-sharded step gathers parameters, the
sampler's scan holds its collectives inside a loop, and a peak over the chip's HBM names the program
and exits non-zero.
"""

import io
import math

import jax
import numpy as np
import pytest
from helpers.config_files import load_config

from gmflow_jax import aot, gm

pytest.importorskip("libtpu", reason="jax[tpu] (libtpu) is needed for TPU topologies")

HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  %g = bf16[4,8]{1,0:T(4,128)(2,1)} get-tuple-element(%p), index=1
  %ag = bf16[16,8]{1,0:T(8,128)(2,1)} all-gather(%g), dimensions={0}
  %rs = f32[2,8]{1,0} reduce-scatter(%ag), dimensions={0}, to_apply=%add
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %g)
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main () -> f32[] {
  %w = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body
  %ar = f32[1024]{0} all-reduce(%v), to_apply=%add
  %cps = (f32[3]{0}, f32[3]{0}, u32[]{:S(2)}) collective-permute-start(%q), source_target_pairs={{0,1}}
  %cpd = f32[3]{0} collective-permute-done(%cps)
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_are_counted_by_kind_with_result_bytes_and_loop_scope():
    found = aot.collectives_of(HLO)
    assert found["total"] == {
        "all-gather": {"count": 1, "bytes": 16 * 8 * 2},
        "reduce-scatter": {"count": 1, "bytes": 2 * 8 * 4},
        "all-reduce": {"count": 1, "bytes": 1024 * 4},
        "collective-permute": {"count": 1, "bytes": 3 * 4},  # the -done, not the -start tuple
    }
    assert found["in_loops"] == {
        "all-gather": {"count": 1, "bytes": 256},
        "reduce-scatter": {"count": 1, "bytes": 64},
    }


def test_unknown_chip_is_named():
    with pytest.raises(ValueError, match="chip must be one of"):
        aot.topology_chip("v9x:2x2")


@pytest.fixture(scope="module")
def tiny_compile():
    config = load_config("imagenet256", "tiny")
    config.model.num_layers = 1
    config.train.batch_size = 16
    out = io.StringIO()
    reports, over = aot.run(config, "v5p:2x2x2", sampler_batch_per_chip=2, out=out)
    return config, {r.name: r for r in reports}, over, out.getvalue()


def _shard_bytes(config):
    """Per-chip bytes of the train state and batch, from the shardings alone."""
    mesh = aot.make_mesh(config.mesh, devices=aot.topology_devices("v5p:2x2x2"))
    keys = aot.run_keys(int(config.seed))
    opt_cfg, _, _ = aot.step_settings(config)
    tx = aot.make_adamw(opt_cfg)
    rules, _, min_fsdp = aot._rules(config, mesh)
    _, init, shardings = aot.init_on_mesh(
        lambda: aot.build_model(config.model, keys["init"]),
        tx,
        keys["train"],
        mesh,
        rules,
        min_fsdp,
    )
    abstract = jax.eval_shape(init)
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def test_tiny_train_step_compiles_for_v5p_with_consistent_figures(tiny_compile):
    config, reports, over, text = tiny_compile
    step = reports["train_step"]
    state_bytes = _shard_bytes(config)
    batch_bytes = 2 * (8 * 8 * 4 * 4 + 4)  # 2 rows per chip: x0 float32 [8, 8, 4] and a label
    # TPU layouts pad small arrays to tiles: the figures are at least the logical shard sizes.
    assert step.argument_bytes >= state_bytes + batch_bytes
    assert step.alias_bytes >= state_bytes  # the donated state is reused in full
    assert step.peak_bytes >= step.argument_bytes
    assert step.flops > 0 and math.isfinite(step.flops)
    assert step.collectives["total"]["all-gather"]["count"] > 0  # fsdp=8 gathers parameters
    assert over == []
    assert "v5p:2x2x2 x1: 8 chips, 2 hosts, mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in text
    assert "== train_step (global_batch=16, per_chip=2" in text


def test_parameter_gathers_of_the_bf16_step_move_bf16(tiny_compile):
    # the linears cast their float32 parameters to the compute dtype before the product, so the
    # TPU compiler gathers the bf16 copies (half the bytes of gathering the float32 shards)
    _, reports, _, _ = tiny_compile
    gathers = [
        op
        for op in reports["train_step"].ops
        if op.kind in ("all-gather", "collective-permute") and op.op_name.endswith("dot_general")
    ]
    assert gathers
    assert all(op.shape.startswith("bf16[") for op in gathers), [op.shape for op in gathers]


def test_loop_collectives_are_listed_with_shapes_and_op_names():
    ops = aot.collective_ops(HLO)
    assert [(op.kind, op.in_loop, op.shape.split("{")[0], op.bytes) for op in ops] == [
        ("all-gather", True, "bf16[16,8]", 256),
        ("reduce-scatter", True, "f32[2,8]", 64),
        ("all-reduce", False, "f32[1024]", 4096),
        ("collective-permute", False, "f32[3]", 12),
    ]
    report = aot.ProgramReport("p", 0, 0, 0, 0, 0, 0, 0.0, aot.collectives_of(HLO), {}, ops)
    assert aot.loop_collective_lines(report) == [
        "    all-gather bf16[16,8] x1  []",
        "    reduce-scatter f32[2,8] x1  []",
    ]


def test_tiny_sampler_compiles_with_its_scan_as_a_loop(tiny_compile):
    _, reports, _, text = tiny_compile
    sampler = reports["sampler"]
    assert sampler.details["chunk"] == 16 and sampler.details["per_chip"] == 2
    assert sampler.collectives["in_loops"]  # the solver's scan over steps runs the network inside
    assert sampler.peak_bytes >= sampler.argument_bytes > 0
    assert "== sampler (per_chip=2, chunk=16" in text


def test_a_peak_over_the_chips_memory_names_the_program(monkeypatch, tiny_compile):
    _, reports, _, _ = tiny_compile
    step = reports["train_step"]
    monkeypatch.setitem(aot.HBM_GIB, "v5p", step.peak_bytes / 2 / aot.GIB)
    over = aot.over_budget(list(reports.values()), "v5p")
    assert any(m.startswith("train_step: peak") and "v5p chip" in m for m in over)
    monkeypatch.setitem(aot.HBM_GIB, "v5p", step.peak_bytes / aot.GIB)  # exactly full: fits
    assert not any(m.startswith("train_step") for m in aot.over_budget([step], "v5p"))


def test_a_tpu_compile_traces_the_gm_math_in_its_tpu_forms():
    # the host is a CPU, so the GM math would otherwise trace its XLA:CPU forms into a TPU program
    assert gm.cpu_reformulations()  # this host
    tpu = aot.make_mesh(aot.MeshConfig(), devices=aot.topology_devices("v5p:2x2x2"))
    with aot._forms_of(tpu):
        assert not gm.cpu_reformulations()
    cpu = aot.make_mesh(aot.MeshConfig(), devices=jax.devices())
    with aot._forms_of(cpu):
        assert gm.cpu_reformulations()

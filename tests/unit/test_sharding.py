"""Tests of the mesh, the sharding rules, the shape-first sharded init and the sharded train step.

Runs on the 8 fake CPU devices of conftest. The oracle of the sharded step is the single-device step of
`train.step.make_train_step` under a plain `jax.jit` on the same initial state and batches: the two must agree up to the order
of floating-point reductions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.models.denoiser import DenoiserFn
from gmflow_jax.models.gm_dit import GMDiT, GMDiTConfig
from gmflow_jax.parallel.mesh import MeshConfig, make_mesh, mesh_shape, resolve_mesh_shape
from gmflow_jax.parallel.sharding import (
    DEFAULT_ACTIVATION_RULES,
    DEFAULT_PARAM_RULES,
    batch_sharding,
    global_batch,
    leaf_spec,
    logical_to_mesh_spec,
    process_rows,
)
from gmflow_jax.train.ema import EMAConfig
from gmflow_jax.train.optimizer import OptimizerConfig, make_adamw
from gmflow_jax.train.state import LossConfig, init_train_state
from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step

MODEL = GMDiTConfig(
    num_layers=1,
    hidden_size=64,
    num_heads=4,
    patch_size=2,
    in_channels=4,
    sample_size=8,
    num_gaussians=4,
    num_classes=10,
    logstd_inner_dim=32,
)
LR = 1e-3
OPT = OptimizerConfig(lr=LR, b2=0.95, weight_decay=0.05, warmup_iters=0, grad_clip_norm=10.0)
EMA = EMAConfig(policy="rampup", ema_kimg=0.1, batch_size=16)
LOSS = LossConfig(trans_ratio=0.5, prob_class=0.9, null_label=MODEL.num_classes)
NUM_STEPS = 2
BATCH = 16
INIT_KEY, TRAIN_KEY = jax.random.split(jax.random.PRNGKey(0))
MESHES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 4, "tensor": 1},
]
SHAPE_FIRST_MESH = MESHES[2]
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA:CPU options of every compile here: about half the compile time; the programs are tiny."""


def _model_fn() -> GMDiT:
    return GMDiT(MODEL, rngs=nnx.Rngs(params=INIT_KEY))


def _batches():
    rs = np.random.default_rng(0)
    return [
        {
            "x0": rs.normal(size=(BATCH, 8, 8, 4)).astype(np.float32),
            "labels": rs.integers(0, MODEL.num_classes, BATCH).astype(np.int32),
        }
        for _ in range(NUM_STEPS)
    ]


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def tx():
    return make_adamw(OPT)


def _compile(jitted, *args):
    """`jitted.lower(*args).compile()` with `FAST_COMPILE`."""
    return jitted.lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def reference(tx):
    """The single-device run: initial state, losses and final state (host numpy)."""
    state = _compile(jax.jit(lambda: init_train_state(_model_fn(), tx, TRAIN_KEY)[1]))()
    initial = _host(state)
    graphdef = nnx.split(nnx.eval_shape(_model_fn))[0]
    batches = _batches()
    step = jax.jit(make_train_step(DenoiserFn(graphdef), tx, OPT, EMA, LOSS), donate_argnums=0)
    step = _compile(step, state, batches[0])
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return {"initial": initial, "losses": losses, "final": _host(state)}


@pytest.fixture(scope="module")
def shape_first(tx):
    """(mesh, graphdef, compiled init, shardings, state) of the shape-first init on (data=2,
    fsdp=4)."""
    mesh = make_mesh(SHAPE_FIRST_MESH)
    graphdef, init, shardings = init_on_mesh(_model_fn, tx, TRAIN_KEY, mesh)
    compiled = _compile(init)
    return mesh, graphdef, compiled, shardings, compiled()


# ----------------------------------------------------------------------------------------------
# Mesh and rules


def test_make_mesh_fills_the_free_axis_and_uses_auto_axes():
    mesh = make_mesh({"data": 2, "fsdp": -1})
    assert mesh_shape(mesh) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert mesh_shape(make_mesh(MeshConfig(data=1, fsdp=2, tensor=-1))) == {
        "data": 1,
        "fsdp": 2,
        "tensor": 4,
    }
    four = make_mesh({"fsdp": -1}, devices=jax.devices()[:4])
    assert mesh_shape(four) == {"data": 1, "fsdp": 4, "tensor": 1}


def test_make_mesh_rejects_sizes_that_do_not_divide_the_devices():
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="cannot fill fsdp"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="dcn_data"):
        resolve_mesh_shape({"dcn_data": 3}, 8)


def test_resolve_mesh_shape_splits_ici_and_dcn():
    ici, dcn = resolve_mesh_shape({"data": 1, "fsdp": -1, "dcn_data": 2}, 16)
    assert ici == (1, 8, 1) and dcn == (2, 1, 1)
    ici, dcn = resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2, "dcn_fsdp": 4}, 32)
    assert ici == (2, 2, 2) and dcn == (1, 4, 1)


def test_logical_to_mesh_spec_takes_the_first_unused_rule():
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("mlp", "fsdp"), ("batch", ("data", "fsdp")))
    assert logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    # a square kernel: the second "embed" cannot reuse fsdp and is replicated
    assert logical_to_mesh_spec(("embed", "embed"), rules) == P("fsdp", None)
    # "mlp" falls through to its second rule when "tensor" is taken ... by nothing here
    assert logical_to_mesh_spec(("batch", "mlp"), rules) == P(("data", "fsdp"), "tensor")
    assert logical_to_mesh_spec((None, "unknown"), rules) == P(None, None)
    with pytest.raises(ValueError, match="pair"):
        logical_to_mesh_spec(("embed",), (("embed",),))


def test_leaf_spec_drops_non_dividing_axes_and_falls_back_to_the_largest_fsdp_dim():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    rules = DEFAULT_PARAM_RULES
    assert leaf_spec((64, 256), ("embed", "mlp"), mesh, rules) == P("fsdp")  # tensor size 1 ok
    assert leaf_spec((6, 256), ("embed", "mlp"), mesh, rules, min_fsdp_size=1) == P(None, "fsdp")
    assert leaf_spec((1024, 1), ("logstd_mlp", "logstd_out"), mesh, rules) == P("fsdp")
    assert leaf_spec((8, 4096), None, mesh, rules) == P(None, "fsdp")
    assert leaf_spec((256,), None, mesh, rules) == P()  # below min_fsdp_size
    assert leaf_spec((), None, mesh, rules) == P()
    with pytest.raises(ValueError, match="not in the mesh"):
        leaf_spec((8,), ("embed",), mesh, (("embed", "model"),))


def test_process_rows_of_a_single_process_is_the_whole_batch():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    np.testing.assert_array_equal(process_rows(mesh, 16), np.arange(16))
    with pytest.raises(ValueError, match="multiple of data \\* fsdp = 8"):
        process_rows(mesh, 12)
    batch = global_batch({"x0": np.arange(32.0).reshape(16, 2)}, mesh)
    assert batch["x0"].sharding == batch_sharding(mesh)
    rows = sorted((s.index[0].start, s.index[0].stop) for s in batch["x0"].addressable_shards)
    assert rows == [(2 * i, 2 * i + 2) for i in range(8)]
    np.testing.assert_array_equal(np.asarray(batch["x0"]), np.arange(32.0).reshape(16, 2))


# ----------------------------------------------------------------------------------------------
# Shape-first init and sharded state


def _state_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_shape_first_init_never_materializes_the_full_params_on_one_device(shape_first):
    mesh, _, compiled, shardings, _ = shape_first
    want = [s.spec for s in jax.tree.leaves(shardings)]
    got = [s.spec for s in jax.tree.leaves(compiled.output_shardings)]
    assert got == want
    abstract = jax.eval_shape(init_on_mesh(_model_fn, make_adamw(OPT), TRAIN_KEY, mesh)[1])
    total, params = _state_bytes(abstract), _state_bytes(abstract.params)
    stats = compiled.memory_analysis()
    # per device: about 1/fsdp of the state as outputs, and no full copy of the params as scratch
    assert stats.output_size_in_bytes < 0.35 * total, (stats, total)
    assert stats.temp_size_in_bytes < 0.5 * params, (stats, params)


def test_params_optimizer_state_and_ema_are_sharded_along_fsdp(shape_first):
    _, _, _, _, state = shape_first
    fsdp = 4
    trees = {
        "params": state.params,
        "mu": state.opt_state[0].mu,
        "nu": state.opt_state[0].nu,
        "ema": state.ema_params,
    }
    for name, tree in trees.items():
        kernel = tree["blocks"][0]["mlp_in"]["kernel"][...]
        assert kernel.sharding.spec[0] == "fsdp", name
        assert {s.data.shape for s in kernel.addressable_shards} == {(64 // fsdp, 256)}, name
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if leaf.size >= 4096:
                assert "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec)), (name, path)
                assert leaf.addressable_shards[0].data.size == leaf.size // fsdp, (name, path)
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()
    assert state.opt_state[0].count.sharding.spec == P()


def test_shape_first_init_equals_the_single_device_init(shape_first, reference):
    _, _, _, _, state = shape_first
    for got, want in zip(
        jax.tree.leaves(_host(state)), jax.tree.leaves(reference["initial"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# Sharded step == single-device step


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "data{data}_fsdp{fsdp}".format(**s))
def test_sharded_step_matches_the_single_device_step(shape, tx, reference, shape_first):
    if shape == SHAPE_FIRST_MESH:
        mesh, graphdef, init, shardings, _ = shape_first
        state = init()  # a fresh state (the fixture's is used by other tests; the step donates)
    else:
        mesh = make_mesh(shape)
        graphdef, init, shardings = init_on_mesh(_model_fn, tx, TRAIN_KEY, mesh)
        state = jax.device_put(
            jax.tree.map(jnp.asarray, reference["initial"]), shardings
        )  # skip a compile
    step = jit_train_step(
        make_train_step(DenoiserFn(graphdef), tx, OPT, EMA, LOSS), mesh, shardings
    )
    batches = [global_batch(batch, mesh) for batch in _batches()]
    step = _compile(step, state, batches[0])
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5, atol=1e-6)
    # fp32 reduction order only: far below one Adam step (|update| ~ lr per step)
    tol = 0.05 * LR * NUM_STEPS
    final = _host(state)
    for name in ("params", "ema_params"):
        for got, want in zip(
            jax.tree.leaves(getattr(final, name)),
            jax.tree.leaves(getattr(reference["final"], name)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=tol, err_msg=name)
    assert int(final.step) == NUM_STEPS
    kernel = state.params["blocks"][0]["attn_q"]["kernel"][...]
    assert kernel.sharding.mesh == mesh
    assert kernel.sharding.spec == (P("fsdp") if shape["fsdp"] > 1 else P())


def test_activation_rules_constrain_the_traced_step_and_never_leak(tx):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, init, shardings = init_on_mesh(_model_fn, tx, TRAIN_KEY, mesh)
    state = jax.eval_shape(init)  # lowering only: nothing is compiled or allocated
    assert state.params["blocks"][0]["mlp_in"]["kernel"].get_value().sharding.spec == P(
        "fsdp", "tensor"
    )
    sharding = batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
        for k, v in _batches()[0].items()
    }
    texts = {}
    for name, rules in (("rules", DEFAULT_ACTIVATION_RULES), ("none", None)):
        pure = make_train_step(DenoiserFn(graphdef), tx, OPT, EMA, LOSS)
        step = jit_train_step(pure, mesh, shardings, rules)
        texts[name] = step.lower(state, batch).as_text()
    # residual stream (batch over data x fsdp) and the MLP hidden layer (also over tensor)
    assert "sharding_constraint" in texts["rules"]
    assert '[{"data", "fsdp"}, {}, {"tensor"}]' in texts["rules"]
    assert "sharding_constraint" not in texts["none"]  # a trace with rules is not reused


# ----------------------------------------------------------------------------------------------
# Checkpoints across device counts


@pytest.mark.parametrize("num_devices", [4, 1])
def test_checkpoint_saved_on_8_devices_restores_on_fewer(tmp_path, tx, shape_first, num_devices):
    _, _, _, _, state = shape_first
    expected = _host(state)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        assert ckpt.save(1, state)
    devices = jax.devices()[:num_devices]
    small = make_mesh({"data": 1, "fsdp": -1}, devices=devices)
    _, init, shardings = init_on_mesh(_model_fn, tx, TRAIN_KEY, small)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        restored, _ = ckpt.restore(1, jax.eval_shape(init))
    for got, want, sharding in zip(
        jax.tree.leaves(restored),
        jax.tree.leaves(expected),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        assert got.sharding == sharding
        assert got.sharding.device_set == set(devices)
        np.testing.assert_array_equal(np.asarray(got), want)

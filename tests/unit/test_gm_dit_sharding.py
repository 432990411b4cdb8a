"""GM-DiT on a mesh: remat policies and batch-sharded activations.

Remat policies change memory, never the function: every policy's loss and gradients equal those of
the plain (no remat) model, compiled memory differs, and the jaxpr holds the rematerialization the
policy names. On an 8-device fsdp mesh with the default activation rules every constrained
activation (conditioning, adaLN modulation, head) appears in the lowered HLO under its logical names
with its batch dimension split over data x fsdp, and the compiled gradient all-reduces no tensor
with a batch dimension (activations are never summed across devices; only parameter gathers and
gradient reductions remain).
"""

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.aot import collective_ops
from gmflow_jax.models.gm_dit import REMAT_POLICIES, GMDiT, GMDiTConfig
from gmflow_jax.parallel.mesh import MeshConfig, make_mesh
from gmflow_jax.parallel.sharding import (
    DEFAULT_ACTIVATION_RULES,
    DEFAULT_PARAM_RULES,
    batch_sharding,
    param_shardings,
)

# Sizes chosen so the batch (24 global, 3 per device) is no other dimension of the model.
TINY = GMDiTConfig(
    num_layers=3,
    hidden_size=64,
    num_heads=2,
    sample_size=8,
    num_classes=10,
    logstd_inner_dim=48,
    num_gaussians=2,
    dtype="bfloat16",
    scan_blocks=True,
)
BATCH = 24


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, 8, 8, 4)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, batch), jnp.float32)
    y = jnp.asarray(rng.integers(0, 11, batch), jnp.int32)
    return x, t, y


def _params_and_graph(cfg: GMDiTConfig):
    """The graphdef of `cfg` and perturbed parameters (zero-init layers made non-zero)."""
    graphdef, state = nnx.split(GMDiT(cfg, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return graphdef, jax.tree.unflatten(tree, leaves)


def _loss(graphdef, state, x, t, y):
    gm = nnx.merge(graphdef, state)(x, t, y)
    # a scalar that reads every output (means, weights, the log-std head)
    return (
        jnp.mean(jnp.square(gm.means))
        + jnp.mean(gm.logweights * jnp.arange(gm.logweights.shape[-2])[:, None])
        + jnp.mean(gm.logstds)
    )


def _policy_config(policy: str) -> GMDiTConfig:
    return dataclasses.replace(TINY, remat=policy != "none", remat_policy=policy)


def test_remat_policy_is_validated_and_off_without_remat():
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        GMDiTConfig(remat_policy="everything")
    assert GMDiTConfig(remat=False, remat_policy="full").effective_remat_policy == "none"
    assert GMDiTConfig(remat=True).effective_remat_policy == "full"  # the pre-policy remat=True


@pytest.mark.parametrize("policy", ["full", "save_linear_inputs"])
def test_remat_policies_give_the_plain_models_loss_and_gradients(policy):
    x, t, y = _inputs(4, seed=3)
    graphdef, state = _params_and_graph(TINY)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(
        graphdef, state, x, t, y
    )
    graphdef_p, _ = nnx.split(
        nnx.eval_shape(lambda: GMDiT(_policy_config(policy), rngs=nnx.Rngs(0)))
    )
    loss, grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(
        graphdef_p, state, x, t, y
    )
    # the recomputed forward is the same sequence of bf16 operations: equal up to XLA's fusion
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-2 * scale


def _remat_eqns(jaxpr) -> list:
    """Every remat (checkpoint) equation in a closed jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found.extend(_remat_eqns(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found.extend(_remat_eqns(sub))
    return found


def test_each_policy_traces_its_own_rematerialization():
    x, t, y = _inputs(2)
    _, state = _params_and_graph(TINY)
    for policy, expected in REMAT_POLICIES.items():
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda p=policy: GMDiT(_policy_config(p), rngs=nnx.Rngs(0)))
        )
        jaxpr = jax.make_jaxpr(lambda s, g=graphdef: _loss(g, s, x, t, y))(state).jaxpr
        eqns = _remat_eqns(jaxpr)
        if policy == "none":
            assert eqns == []
        else:
            assert len(eqns) == 1  # one remat around the scanned block
            assert eqns[0].params["policy"] is expected


def test_remat_policies_trade_memory_in_the_compiled_gradient():
    x, t, y = _inputs(BATCH)
    _, state = _params_and_graph(TINY)
    temp = {}
    for policy in REMAT_POLICIES:
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda p=policy: GMDiT(_policy_config(p), rngs=nnx.Rngs(0)))
        )
        grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
        temp[policy] = grad.lower(graphdef, state, x, t, y).compile().memory_analysis()
        temp[policy] = temp[policy].temp_size_in_bytes
    # no remat keeps every intermediate; saving the linears' inputs keeps some; full keeps none
    assert temp["none"] > temp["save_linear_inputs"] > temp["full"], temp


# --------------------------------------------------------------------------------------------------
# on a mesh


@pytest.fixture(scope="module")
def mesh_program():
    """(lowered, compiled) gradient of the tiny model on an 8-device fsdp mesh with the rules."""
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:8])
    cfg = dataclasses.replace(TINY, remat=True)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GMDiT(cfg, rngs=nnx.Rngs(0))))
    shardings = param_shardings(state, mesh, DEFAULT_PARAM_RULES, min_fsdp_size=64)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    bsh = batch_sharding(mesh)
    x, t, y = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bsh) for a in _inputs(BATCH))

    def loss(state, x, t, y):
        with (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nnx.logical_axis_rules(DEFAULT_ACTIVATION_RULES),
        ):
            return _loss(graphdef, state, x, t, y)

    lowered = jax.jit(jax.grad(loss)).lower(state, x, t, y)
    return lowered, lowered.compile()


CONSTRAINED = (
    "batch,freq",
    "batch,cond",
    "batch,embed",
    "batch,modulation",
    "batch,length,embed",
    "batch,length,mlp",
    "batch,length,head_out",
    "batch,_,_,_",
    "batch,logstd_mlp",
    "batch,logstd_out",
)


def test_constraint_names_appear_in_the_lowered_hlo_with_the_batch_split(mesh_program):
    lowered, _ = mesh_program
    text = lowered.as_text(debug_info=True)
    # location aliases: #locN = loc("...constrain(names)...")
    aliases = {
        alias: names
        for alias, names in re.findall(
            r"^(#loc\d+) = loc\(\"[^\"]*constrain\(([^)]*)\)", text, re.M
        )
    }
    assert set(aliases.values()) >= set(CONSTRAINED)
    seen = set()
    for line in text.splitlines():
        call = re.search(r"sdy.sharding_constraint %\S+ <@\w+, \[(.*)\]> .* loc\((#loc\d+)\)", line)
        if call and call.group(2) in aliases:
            dims, names = re.findall(r"\{([^}]*)\}", call.group(1)), aliases[call.group(2)]
            assert len(dims) == names.count(",") + 1, (names, line)
            # the batch dimension over data x fsdp (8 devices), no other dimension over either
            assert re.findall(r'"(\w+)"', dims[0]) == ["data", "fsdp"], (names, line)
            assert not any(re.search(r'"(data|fsdp)"', d) for d in dims[1:]), (names, line)
            seen.add(names)
    assert seen >= set(CONSTRAINED)


def test_no_tensor_with_a_batch_dimension_is_all_reduced(mesh_program):
    _, compiled = mesh_program
    ops = collective_ops(compiled.as_text())
    assert any(op.kind == "all-gather" for op in ops)  # fsdp gathers the parameters
    reduced = [op.shape for op in ops if op.kind in ("all-reduce", "reduce-scatter")]
    assert reduced  # the gradients of the fsdp-sharded and replicated parameters
    for shape in reduced:
        for dims in re.findall(r"\[([0-9,]*)\]", shape):
            sizes = {int(d) for d in dims.split(",") if d}
            assert not sizes & {BATCH, BATCH // 8}, shape

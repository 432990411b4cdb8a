"""The train state and the training loss.

`docs/math.md`:

==============================  ==================================================================
name                            section
==============================  ==================================================================
`LossConfig`, `t_sampler`       §1.3 training t sampler (uniform / logit-normal, shift), §4.1, §4.2,
                                §4.3 spectral loss weight, §4.4 label dropout
`drop_labels`                   §4.4 classifier-free label dropout to the null label
`TrainState`, `init_train_state`  §4.6 / §4.7: params, AdamW state, EMA (a copy at init), step, rng
`loss_terms`, `compute_loss`    §4.1-4.4: label dropout, transition GM-NLL or flow-matching L2, and
                                the spectral loss when a spectrum seam is given
==============================  ==================================================================

The optional spectrum seam `spectrum(params, m, v) -> psi` (the SpectrumMLP, §6.3) reads the same
params tree as the denoiser. Its loss only reaches the SpectrumMLP parameters (its inputs are
stop-gradient summaries of the network's GM, §4.3), and the transition loss never reaches them (the
denoiser does not use them), so one optimizer over the whole tree trains both as in the reference.

The loss never sees a network: it calls the pure denoiser function of `models.denoiser.network_functions`
on the split parameters. The step that applies it lives in `train.step`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from gmflow_jax import flow, losses
from gmflow_jax.gm import GM

Array = jax.Array
PyTree = Any

OBJECTIVES = ("transition_nll", "flow_matching_l2")
"""Training objectives: GMFlow's transition GM-NLL (§4.2) and the flow-matching baseline's L2."""

T_SAMPLERS = ("uniform", "logit_normal")
"""Training timestep samplers (§1.3)."""

LABEL_DROPOUT_STREAM = 0x1ABE1
"""fold_in constant of the label-dropout key: a stream independent of t and the noises (§10)."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Training objective settings (§1.3, §4.1, §4.2)."""

    objective: str = "transition_nll"
    """One of `OBJECTIVES`; the baseline (mean-only model) uses "flow_matching_l2"."""
    trans_ratio: float = 0.9
    """r in t_low = t_high (1 - r) (§4.1); 1 gives t_low = 0."""
    weight_scale: float = 1.0
    """Loss multiplier (§4.2)."""
    t_sampler: str = "uniform"
    """One of `T_SAMPLERS` (§1.3)."""
    logit_normal_mean: float = 0.0
    """Logit-normal location m_ln."""
    logit_normal_std: float = 1.0
    """Logit-normal scale s_ln."""
    shift: float = 1.0
    """Timestep shift a (§1.2)."""
    prob_class: float = 1.0
    """Probability of keeping a label; otherwise it becomes `null_label` (§4.4; 1.0 = no dropout)."""
    null_label: int = -1
    """The unconditional label (num_classes); required when prob_class < 1."""
    spectral_weight: float = 1.0
    """w_spec of the spectral loss (§4.3), used when a spectrum seam is given."""

    def __post_init__(self):
        """Validate the fields, naming the bad one."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.t_sampler not in T_SAMPLERS:
            raise ValueError(f"t_sampler must be one of {T_SAMPLERS}, got {self.t_sampler!r}")
        if not 0.0 < self.trans_ratio <= 1.0:
            raise ValueError(f"trans_ratio must be in (0, 1], got {self.trans_ratio}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.prob_class <= 1.0:
            raise ValueError(f"prob_class must be in [0, 1], got {self.prob_class}")
        if self.prob_class < 1.0 and self.null_label < 0:
            raise ValueError(
                f"prob_class={self.prob_class} < 1 drops labels to null_label, which must be the "
                f"model's null label (num_classes >= 0), got null_label={self.null_label}"
            )
        if self.spectral_weight < 0:
            raise ValueError(f"spectral_weight must be >= 0, got {self.spectral_weight}")


def t_sampler(cfg: LossConfig) -> Callable[[Array, tuple[int, ...]], Array]:
    """The training timestep sampler `(key, shape) -> t` in t units (§1.3, with the §1.2 shift)."""
    if cfg.t_sampler == "uniform":
        return functools.partial(flow.sample_t_uniform, shift=cfg.shift)
    return functools.partial(
        flow.sample_t_logit_normal,
        mean=cfg.logit_normal_mean,
        std=cfg.logit_normal_std,
        shift=cfg.shift,
    )


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    step: Array
    """0-based index of the next iteration, int32 scalar."""
    params: PyTree
    """Network state from `nnx.split` (trainable parameters)."""
    opt_state: PyTree
    """AdamW state (`optimizer.make_adamw`)."""
    ema_params: PyTree
    """EMA of `params` (§4.7)."""
    rng: Array
    """Base PRNG key (raw uint32 [2]); iteration i uses fold_in(rng, i)."""


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, rng: Array
) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` and build the step-0 state (EMA = a copy of the params)."""
    graphdef, params = nnx.split(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jnp.asarray(rng),
    )
    return graphdef, state


def drop_labels(key: Array, labels: Array, prob_class: float, null_label: int) -> Array:
    """Keep each label with probability `prob_class`, else replace it by `null_label` (§4.4).

    One independent Bernoulli draw per sample from `key`.
    """
    keep = jax.random.bernoulli(key, prob_class, labels.shape)
    return jnp.where(keep, labels, jnp.asarray(null_label, labels.dtype))


def loss_terms(
    denoiser: Callable[..., GM | Array],
    params: PyTree,
    key: Array,
    x0: Array,
    labels: Array | None,
    loss_cfg: LossConfig,
    spectrum: Callable[..., Array] | None = None,
) -> dict[str, Array]:
    """The loss terms of one batch `x0` `[B, H, W, C]` (§4.1-4.4): {"trans"[, "spec"]}, float32.

    With prob_class < 1, labels are first dropped to the null label with a key folded from `key`
    (`LABEL_DROPOUT_STREAM`), so t and the noises are the same with or without dropout. Draws
    (t_high, t_low, x_low, x_high) with `losses.transition_pair`; the GM denoiser is scored by the
    transition GM-NLL at x_low, a mean-only denoiser by the flow-matching L2 to
    u = (x_high - x0)/sigma_high. With a `spectrum` seam, "spec" is the §4.3 spectral loss of the
    stop-gradient KR residual under psi = spectrum(params, m, v).
    """
    if labels is not None and loss_cfg.prob_class < 1.0:
        drop_key = jax.random.fold_in(key, LABEL_DROPOUT_STREAM)
        labels = drop_labels(drop_key, labels, loss_cfg.prob_class, loss_cfg.null_label)
    t_high, t_low, x_low, x_high = losses.transition_pair(
        key, x0, loss_cfg.trans_ratio, t_sampler(loss_cfg)
    )
    out = denoiser(params, x_high, t_high, labels)
    if loss_cfg.objective == "transition_nll":
        if not isinstance(out, GM):
            raise ValueError(
                f"objective 'transition_nll' needs a GM denoiser, got {type(out).__name__}"
            )
        loss, _ = losses.transition_nll_loss(
            out, x_high, t_high, x_low, t_low, loss_cfg.weight_scale
        )
    else:
        if isinstance(out, GM):
            raise ValueError("objective 'flow_matching_l2' needs a mean-only denoiser, got a GM")
        if spectrum is not None:
            raise ValueError("the spectral loss needs a GM denoiser; got a mean-only denoiser")
        loss, _ = losses.flow_matching_l2_loss(out, x0, x_high, t_high, loss_cfg.weight_scale)
    terms = {"trans": loss}
    if spectrum is not None:
        m, v, big_z = losses.spectral_targets(out, x0, x_high, t_high)
        psi = spectrum(params, m, v)
        terms["spec"] = losses.spectral_loss(big_z, psi, loss_cfg.spectral_weight)
    return terms


def compute_loss(
    denoiser: Callable[..., GM | Array],
    params: PyTree,
    key: Array,
    x0: Array,
    labels: Array | None,
    loss_cfg: LossConfig,
    spectrum: Callable[..., Array] | None = None,
) -> Array:
    """The training loss of one batch (§4.1-4.4): the sum of `loss_terms`, float32 scalar."""
    terms = loss_terms(denoiser, params, key, x0, labels, loss_cfg, spectrum)
    if "spec" in terms:
        return terms["trans"] + terms["spec"]
    return terms["trans"]

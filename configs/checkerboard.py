"""2-D checkerboard: GMFlow (K = 64 toy MLP) or the flow-matching baseline, trained and evaluated.

Launch (from the repository root; rerunning the same command resumes, or goes straight to evaluation
when training already finished):

    python -m gmflow_jax.main --config=configs/checkerboard.py --workdir=runs/checkerboard

Variants, chosen by the suffix after the file name (tokens joined by "_"):

* (none)          small GMFlow run: 6000 steps at batch 512 (about 5 min of training at the idle
                  2-core rate of ~20 it/s; batch 512 runs 2.4x more steps per second than 1024 here)
                  plus 16 evaluations of 50k samples (about 2.5 min), about 8 min in all on an idle
                  2-core CPU (see the README for the measured time);
* `baseline`      the same, flow-matching baseline (mean-only head, L2 loss, baseline solvers);
* `full`          the paper's setting (`docs/math.md` §8.3): batch 4096, 200k iterations,
                  10^6 evaluation samples; `full_baseline` for its baseline;
* `tiny`          a seconds-long smoke run for tests; `tiny_baseline` for its baseline.
* `classes`       the class-conditional checkerboard (issue 16; any size, with or without
                  `baseline`): each white cell is a class, label dropout 0.1 to the null label 8,
                  evaluated by the guidance sweep (precision / within-cell fidelity / over-shoot
                  per row, NFE and guidance scale; `gmflow_jax/tasks/checkerboard_classes.py`).

e.g. `--config=configs/checkerboard.py:full`. Any field can be overridden on the command line, e.g.
`--config.train.num_steps=100` or `--config.model.mean_only=True` (which also switches the evaluated
solvers to the baseline ones).
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.config_variant import parse_variant

SIZES = ("small", "full", "tiny")
"""Run sizes selectable by the variant string (default "small")."""


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The checkerboard config for `variant` ("", "baseline", "full", "full_baseline", "tiny", ...)."""
    size, switches = parse_variant("checkerboard", variant, SIZES, "small", ("baseline", "classes"))
    baseline = "baseline" in switches
    config = ml_collections.ConfigDict()
    config.seed = 0  # root PRNG seed: model init, training noise, data, evaluation noise

    config.model = ml_collections.ConfigDict()
    config.model.name = "toy_mlp"  # the §6.4 toy 2-D MLP denoiser
    config.model.num_gaussians = 64  # K, mixture components of the GM head
    config.model.embed_dim = 256  # width of each of the time and position embeddings
    config.model.hidden_dim = 512  # width of the hidden Linear layers
    config.model.num_layers = 5  # number of Linear -> SiLU layers
    config.model.pos_min_period = 5e-3  # shortest period of the point position embedding
    config.model.pos_max_period = 50.0  # longest period of the point position embedding
    config.model.mean_only = baseline  # True: flow-matching baseline (u-mean head, L2 loss)

    config.data = ml_collections.ConfigDict()
    config.data.name = "checkerboard"  # 4x4 board on [-4, 4]^2, uniform on the 8 white cells (§4.8)

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 200_000  # training iterations
    config.train.batch_size = 4096  # points per iteration
    config.train.trans_ratio = 0.9  # r: t_low = t_high (1 - r) (§4.1); 1.0 targets x0
    config.train.weight_scale = 1.0  # loss multiplier (§4.2)
    config.train.t_sampler = "uniform"  # training t sampler: "uniform" or "logit_normal" (§1.3)
    config.train.logit_normal_mean = 0.0  # logit-normal location (logit_normal sampler only)
    config.train.logit_normal_std = 1.0  # logit-normal scale (logit_normal sampler only)
    config.train.shift = 1.0  # timestep shift of the training sampler (§1.2)
    config.train.log_every = 500  # steps between host syncs: metrics, finiteness check, TensorBoard
    config.train.max_consecutive_skips = 100  # skipped (non-finite) steps in a row that stop a run

    config.train.optimizer = ml_collections.ConfigDict()
    config.train.optimizer.lr = 2e-4  # AdamW peak learning rate (§4.6)
    config.train.optimizer.b1 = 0.9  # Adam beta_1
    config.train.optimizer.b2 = 0.999  # Adam beta_2
    config.train.optimizer.eps = 1e-8  # Adam epsilon
    config.train.optimizer.weight_decay = 0.0  # decoupled weight decay (never on biases)
    config.train.optimizer.warmup_iters = 1000  # linear lr warm-up iterations
    config.train.optimizer.warmup_ratio = 0.001  # lr at iteration 0, as a fraction of lr
    config.train.optimizer.grad_clip_norm = 0.0  # global-norm clip threshold; 0 = no clipping
    config.train.optimizer.clip_begin = 0  # first iteration of clipping and the non-finite skip
    config.train.optimizer.skip_nonfinite = False  # skip steps with a non-finite grad norm

    config.train.ema = ml_collections.ConfigDict()
    config.train.ema.policy = "karras"  # EMA beta policy: "karras", "rampup" or "fixed" (§4.7)
    config.train.ema.gamma = 7.0  # karras: beta_i = (1 - 1/(i+1))^(gamma+1)
    config.train.ema.ema_kimg = 30000.0  # rampup: half-life cap in kimg
    config.train.ema.ema_rampup = 0.05  # rampup: half-life as a fraction of images seen
    config.train.ema.batch_size = config.train.get_ref("batch_size")  # rampup: images/iteration
    config.train.ema.eps = 1e-8  # rampup: floor of the half-life
    config.train.ema.beta = 0.999  # fixed: the constant beta

    config.sample = ml_collections.ConfigDict()
    # GMFlow rows, in the sampler-row grammar of gmflow_jax/solvers/config.py (`_2` = 2nd order).
    config.sample.gm_solvers = ("gm_sde", "gm_sde_2", "gm_ode", "gm_ode_2")
    config.sample.gm_nfes = (1, 2, 4, 8)  # GMFlow columns: network evaluations
    config.sample.baseline_solvers = (  # baseline rows (sampler-row grammar)
        "euler",
        "ddpm_small",
        "ddpm_large",
        "dpmpp_2m",
        "dpmpp_2m_sde",
    )
    config.sample.baseline_nfes = (1, 2, 4, 8, 16, 32)  # baseline columns
    config.sample.gm_ode_substeps_total = 128  # GM-ODE substeps S = ceil(this / NFE)
    config.sample.shift = 1.0  # timestep shift of the inference grid (§1.4)
    config.sample.batch_size = 50_000  # points per jitted sampler call

    config.eval = ml_collections.ConfigDict()
    config.eval.enabled = True  # evaluate after training
    config.eval.num_samples = 1_000_000  # samples per (solver, NFE)
    config.eval.metrics_file = "metrics.json"  # written atomically in the workdir
    config.eval.figure_file = "samples.png"  # histogram grid, rows = solver, cols = NFE
    # Why off: the small main job's time budget; e.g. 1000 adds ~1 s of sampling per evaluation.
    config.eval.every_steps = 0  # steps between evaluations during training (0 = off)
    config.eval.periodic_samples = 8192  # points of each evaluation during training

    config.profile = ml_collections.ConfigDict()  # jax.profiler trace into workdir/profile
    config.profile.skip_steps = 5  # steps of this invocation before the trace (compile, warm-up)
    config.profile.num_steps = 0  # steps traced; 0 = profiling off
    config.profile.all_hosts = False  # trace every process (True) or process 0 only

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 20_000  # save interval (and always at the end)
    config.checkpoint.max_to_keep = 3  # newest checkpoints kept
    config.checkpoint.async_save = True  # write checkpoints in the background
    config.checkpoint.restart = False  # True: move existing checkpoints aside, train from step 0
    config.checkpoint.restore_from = (
        ""  # another run's checkpoint dir to take weights from ("" = none)
    )

    if size == "small":
        config.train.num_steps = 6000
        config.train.batch_size = 512
        config.train.log_every = 100
        config.train.optimizer.lr = 1e-3
        config.train.optimizer.warmup_iters = 200
        config.eval.num_samples = 50_000
        config.checkpoint.every_steps = 1000
    elif size == "tiny":
        config.model.num_gaussians = 4
        config.model.embed_dim = 16
        config.model.hidden_dim = 32
        config.model.num_layers = 2
        config.train.num_steps = 4
        config.train.batch_size = 64
        config.train.log_every = 2
        config.train.optimizer.warmup_iters = 2
        config.sample.gm_solvers = ("gm_sde", "gm_ode_2")
        config.sample.gm_nfes = (1, 2)
        config.sample.baseline_solvers = ("euler", "dpmpp_2m")
        config.sample.baseline_nfes = (1, 2)
        config.sample.gm_ode_substeps_total = 4
        config.sample.batch_size = 256
        config.eval.num_samples = 512
        config.checkpoint.every_steps = 2
    if "classes" in switches:
        _class_conditional(config, size)
    return config


def _class_conditional(config: ml_collections.ConfigDict, size: str) -> None:
    """The `classes` switch: class-conditional data, label dropout and the guidance sweep."""
    config.data.name = "checkerboard_classes"  # white cell c = class c, uniform on it
    config.model.num_classes = 8  # label table rows 0..7 plus the null label 8 (§4.4)
    config.train.prob_class = 0.9  # keep a label with this probability, else null (§4.4)
    config.sample.gm_rows = ("gm_sde_2", "gm_ode_2")  # GMFlow rows, probabilistic guidance
    config.sample.gm_cfg_rows = ()  # GMFlow rows also run with classic CFG (e.g. ("gm_sde_2",))
    config.sample.baseline_solvers = ("euler", "ddpm_small", "dpmpp_2m")  # baseline rows, CFG
    config.sample.guidance_nfes = (4, 8, 32)  # network evaluations of the sweep
    # Denser where precision peaks (PG w <= 0.45, CFG w <= 2 in a first sweep), up to the ends.
    config.sample.guidance_scales = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.9)  # PG w
    config.sample.cfg_scales = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 3.0, 4.5, 8.0)  # CFG w
    # Why 0: the orthogonal projection removes the bias along m_c, i.e. along the ray from the
    # board's centre to the predicted point, which in 2-D is the outward direction of the corner
    # cells: it would hide exactly the over-shoot this sweep measures.
    config.sample.orthogonal_guidance = 0.0
    config.sample.batch_size = 8000  # points per jitted sampler call
    config.eval.per_class = 500  # samples per class and setting (4000 per setting)
    config.eval.grid_nfe = 8  # NFE of the sample-grid figure
    if size == "tiny":
        config.sample.gm_rows = ("gm_sde_2",)
        config.sample.baseline_solvers = ("euler",)
        config.sample.guidance_nfes = (2,)
        config.sample.guidance_scales = (0.0, 0.5)
        config.sample.cfg_scales = (1.0, 3.0)
        config.sample.batch_size = 128
        config.eval.per_class = 16
        config.eval.grid_nfe = 2

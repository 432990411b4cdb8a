"""Class-conditional digits: GMFlow (K = 8 GM-DiT + SpectrumMLP) or the K = 1 flow-matching baseline.

Launch (from the repository root; rerunning the same command resumes, or goes straight to evaluation
when training already finished):

    python -m gmflow_jax.main --config=configs/digits.py --workdir=runs/digits
    python -m gmflow_jax.main --config=configs/digits.py:baseline --workdir=runs/digits_baseline

Variants, chosen by the suffix after the file name (tokens joined by "_"):

* (none)      GMFlow on scikit-learn's 8x8 digits, the ImageNet recipe (`docs/math.md` §8.1) scaled down: a
              small GM-DiT, trans_ratio 0.5, logit-normal t, label dropout 0.1, SpectrumMLP, AdamW
              (0.9, 0.95) wd 0.05 with warm-up and clipping, EMA rampup scaled to the run; 3000
              steps of 128 took 20.5 minutes on 2 CPU cores shared with other jobs (0.37 s/step),
              then evaluates GM-SDE 2 and GM-ODE 2 with probabilistic guidance (about 4 minutes);
* `baseline`  the same network with a K = 1 mean-only head, the flow-matching L2 loss, and Euler,
              DDPM and DPM++ 2M with classic CFG (w > 1) at evaluation (16 minutes of training);
* `tiny`      a seconds-long smoke run for tests; `tiny_baseline` for its baseline.

The paper-style comparison of the two (guidance sweeps, Table 2 / Table 4 rows) is
`benchmarks/digits.py`. Any field can be overridden on the command line, e.g.
`--config.train.num_steps=100`.
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.config_variant import parse_variant

SIZES = ("small", "tiny")
"""Run sizes selectable by the variant string (default "small")."""

PAPER_EMA_KIMG = 30000.0
"""The paper's EMA half-life cap in kimg (§8.1) for its 200k x 4096 = 819.2M training images."""

PAPER_TRAIN_KIMG = 200_000 * 4096 / 1000
"""Images the paper's ImageNet run sees, in kimg; the EMA cap is scaled by run length / this."""


def scaled_ema_kimg(num_steps: int, batch_size: int) -> float:
    """The paper's EMA half-life cap (30000 kimg of 819.2M images) scaled to this run's length."""
    return PAPER_EMA_KIMG * (num_steps * batch_size / 1000) / PAPER_TRAIN_KIMG


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The digits config for `variant` ("", "baseline", "tiny", "tiny_baseline")."""
    size, switches = parse_variant("digits", variant, SIZES, "small", ("baseline",))
    baseline = "baseline" in switches
    config = ml_collections.ConfigDict()
    config.seed = 0  # root PRNG seed: model init, training noise, data order, evaluation noise

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # scikit-learn's bundled digits (gmflow_jax.data.digits)
    config.data.image_size = 8  # 8 (native) or 16 (bilinear upsampling)

    config.model = ml_collections.ConfigDict()
    config.model.name = "gm_dit"  # GM-DiT (§6.1) wrapped with an optional SpectrumMLP
    config.model.num_layers = 4  # adaLN-Zero blocks
    config.model.hidden_size = 128  # D
    config.model.num_heads = 4  # attention heads (head_dim = D / heads)
    config.model.patch_size = 4  # p: 8x8 digits -> 2x2 = 4 tokens of 4x4 pixels
    config.model.in_channels = 1  # grey-scale
    config.model.sample_size = 8  # H = W, must equal data.image_size
    config.model.num_gaussians = 1 if baseline else 8  # K (1 for the mean-only baseline)
    config.model.num_classes = 10  # digits 0..9; label 10 is the null (unconditional) label
    config.model.logstd_inner_dim = 256  # hidden width of the log-std head
    config.model.mlp_ratio = 4  # block MLP hidden = mlp_ratio * D
    config.model.mean_only = baseline  # True: flow-matching baseline (u-mean head, L2 loss)
    config.model.dtype = "float32"  # compute dtype ("bfloat16" is not faster on CPU); params fp32
    config.model.remat = False  # rematerialize blocks in the backward pass (memory only)
    config.model.scan_blocks = False  # stack the blocks and run them with nnx.scan

    config.model.spectrum_net = ml_collections.ConfigDict()
    config.model.spectrum_net.enabled = not baseline  # SpectrumMLP for spectral loss / sampling
    config.model.spectrum_net.base_size = (1, 8, 8)  # (C, H0, W0): the image's own size
    config.model.spectrum_net.layers = (64, 8)  # the two hidden widths (§6.3)

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 3000  # training iterations
    config.train.batch_size = 128  # images per iteration
    config.train.trans_ratio = 0.5  # r: t_low = t_high (1 - r) (§4.1), ImageNet's 0.5
    config.train.weight_scale = 2.0  # loss multiplier (§4.2), ImageNet's 2.0
    config.train.t_sampler = "logit_normal"  # training t sampler (§1.3)
    config.train.logit_normal_mean = 0.0  # logit-normal location
    config.train.logit_normal_std = 1.0  # logit-normal scale
    config.train.shift = 1.0  # timestep shift of the training sampler (§1.2)
    config.train.prob_class = 0.9  # keep a label with this probability, else null (§4.4)
    config.train.spectral_loss_weight = 1.0  # w_spec of the spectral loss (§4.3)
    config.train.log_every = 100  # steps between host syncs: metrics, finiteness check, TensorBoard
    config.train.max_consecutive_skips = 100  # skipped (non-finite) steps in a row that stop a run

    config.train.optimizer = ml_collections.ConfigDict()
    config.train.optimizer.lr = 1e-3  # AdamW peak learning rate
    config.train.optimizer.b1 = 0.9  # Adam beta_1
    config.train.optimizer.b2 = 0.95  # Adam beta_2 (ImageNet's)
    config.train.optimizer.eps = 1e-8  # Adam epsilon
    config.train.optimizer.weight_decay = 0.05  # decoupled weight decay (never on biases)
    config.train.optimizer.warmup_iters = 200  # linear lr warm-up iterations
    config.train.optimizer.warmup_ratio = 0.001  # lr at iteration 0, as a fraction of lr
    config.train.optimizer.grad_clip_norm = 10.0  # global-norm clip threshold
    config.train.optimizer.clip_begin = 200  # first iteration of clipping and the non-finite skip
    config.train.optimizer.skip_nonfinite = True  # skip steps with a non-finite grad norm

    config.train.ema = ml_collections.ConfigDict()
    config.train.ema.policy = "rampup"  # EMA beta policy (§4.7), ImageNet's
    config.train.ema.gamma = 7.0  # karras only (unused)
    config.train.ema.ema_kimg = scaled_ema_kimg(  # rampup: half-life cap in kimg, follows the run
        config.train.get_ref("num_steps"), config.train.get_ref("batch_size")
    )
    config.train.ema.ema_rampup = 0.05  # rampup: half-life as a fraction of images seen
    config.train.ema.batch_size = config.train.get_ref("batch_size")  # rampup: images/iteration
    config.train.ema.eps = 1e-8  # rampup: floor of the half-life
    config.train.ema.beta = 0.999  # fixed only (unused)

    config.sample = ml_collections.ConfigDict()
    config.sample.gm_solvers = (
        "gm_sde_2",
        "gm_ode_2",
    )  # GMFlow rows (sampler-row grammar, solvers.config)
    config.sample.gm_nfes = (4, 8, 32)  # GMFlow network evaluations
    config.sample.guidance_scales = (0.0, 0.3)  # probabilistic guidance w in [0, 1)
    config.sample.baseline_solvers = ("euler", "ddpm_small", "dpmpp_2m")  # baseline rows
    config.sample.baseline_nfes = (4, 8, 32)  # baseline network evaluations
    config.sample.cfg_scales = (1.0, 3.0)  # classic CFG scales (guidance active when > 1)
    config.sample.gm_ode_substeps_total = 128  # GM-ODE substeps S = ceil(this / NFE) (§5.6)
    config.sample.orthogonal_guidance = 1.0  # orthogonal projection strength (§5.3 step 2)
    config.sample.shift = 1.0  # timestep shift of the inference grid (§1.4)
    config.sample.batch_size = 1000  # images per jitted sampler call

    config.eval = ml_collections.ConfigDict()
    config.eval.enabled = True  # evaluate after training
    config.eval.per_class = 100  # samples per class and setting (1000 images)
    config.eval.grid_per_class = 10  # samples per class shown in the PNG grid
    config.eval.classifier_dir = ""  # where the evaluator's classifier is cached ("" = workdir)
    config.eval.classifier_seed = 0  # seed of the evaluator's classifier
    config.eval.metrics_file = "metrics.json"  # written atomically in the workdir
    config.eval.figure_file = "samples.png"  # PNG grid: a panel per setting, a row per class
    config.eval.every_steps = 1000  # steps between evaluations during training (0 = off)
    config.eval.periodic_samples = 200  # images of each evaluation during training (class-major)

    config.profile = ml_collections.ConfigDict()  # jax.profiler trace into workdir/profile
    config.profile.skip_steps = 5  # steps of this invocation before the trace (compile, warm-up)
    config.profile.num_steps = 0  # steps traced; 0 = profiling off
    config.profile.all_hosts = False  # trace every process (True) or process 0 only

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # save interval (and always at the end)
    config.checkpoint.max_to_keep = 2  # newest checkpoints kept
    config.checkpoint.async_save = True  # write checkpoints in the background
    config.checkpoint.restart = False  # True: move existing checkpoints aside, train from step 0
    config.checkpoint.restore_from = ""  # another run's checkpoint dir to take weights from

    if size == "tiny":
        config.model.num_layers = 1
        config.model.hidden_size = 32
        config.model.num_heads = 2
        config.model.logstd_inner_dim = 16
        config.model.num_gaussians = 1 if baseline else 4
        config.train.num_steps = 3
        config.train.batch_size = 16
        config.train.log_every = 1
        config.train.optimizer.warmup_iters = 2
        config.train.optimizer.clip_begin = 2
        config.sample.gm_solvers = ("gm_sde_2",)
        config.sample.gm_nfes = (2,)
        config.sample.guidance_scales = (0.3,)
        config.sample.baseline_solvers = ("euler",)
        config.sample.baseline_nfes = (2,)
        config.sample.cfg_scales = (2.0,)
        config.sample.gm_ode_substeps_total = 4
        config.sample.batch_size = 40
        config.eval.per_class = 4
        config.eval.grid_per_class = 4
        config.checkpoint.every_steps = 2
    return config

"""ImageNet 256x256 class-conditional GMFlow: the paper's recipe (`docs/math.md` §8.1) on prepared VAE latents.

Prepare the latents once (`tools/prepare_imagenet_latents.py`, see `gmflow_jax.data.imagenet_latents`
for the format), then launch from the repository root (rerunning the same command resumes):

    python tools/prepare_imagenet_latents.py --output_dir=/data/imagenet256_latents ...
    python -m gmflow_jax.main --config=configs/imagenet256.py --workdir=/ckpt/gmflow_imagenet256 \
        --config.data.path=/data/imagenet256_latents

Without prepared latents the run stops at once with that instruction. Multi-host launches: see
`launch/README.md`.

Pod scale (`gmflow_jax.train.loop.train`, on the mesh of the `mesh` section):
the mesh axes data x fsdp x tensor come from `config.mesh` (default: every device on fsdp, so
parameters, AdamW moments and EMA are split ZeRO-3 style; multi-slice: `dcn_data` = slices), the
batch is split over data x fsdp, each process reads only its rows, SIGTERM checkpoints and exits with
status 0, and rerunning resumes from the workdir (then `config.checkpoint.restore_from`, then fresh).
`config.distributed` names an explicit coordinator; left empty, `JAX_COORDINATOR_ADDRESS` /
`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, SLURM or the TPU slice are detected.

Variants:

* (none)  the paper's setting: GM-DiT-XL/2 (K = 8) + SpectrumMLP (4, 32, 32) [64, 8], trans_ratio 0.5,
          logit-normal t, batch 4096, 200k iterations, AdamW 2e-4 (0.9, 0.95) wd 0.05 (not on biases),
          warm-up 1000 (ratio 0.001), clip 10 from iteration 1000, weight_scale 2.0, bf16 compute with
          fp32 parameters, EMA rampup (30000 kimg, 0.05), label dropout 0.1, checkpoints every 1000,
          evaluation GM-ODE 2, 16 steps x 8 substeps, w = 0.04;
* `tiny`  a seconds-long run on synthetic 8x8x4 latents for tests: one guided GM-SDE 2 evaluation
          with spectral sampling.
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.config_variant import parse_variant

SIZES = ("full", "tiny")
"""Run sizes selectable by the variant string (default "full")."""

MESH_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("classes", None),
    ("patch", None),
    ("freq", None),
    ("cond", "tensor"),
    ("head_out", None),
    ("logstd_mlp", "tensor"),
    ("logstd_out", None),
    ("layers", None),
)
"""Parameter logical axis -> mesh axis rules for every name in `gm_dit.LOGICAL_AXIS_NAMES`:
parameters over fsdp on the hidden width and over tensor on the attention / MLP / modulation widths
(Megatron-style); small axes are replicated ("batch" and "length" name activation axes only)."""


ACTIVATION_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("cond", "tensor"),
    ("logstd_mlp", "tensor"),
    ("modulation", None),
    ("freq", None),
    ("head_out", None),
    ("logstd_out", None),
)
"""Logical axis -> mesh axis rules of the model's activation constraints: the batch over data x
fsdp for every activation (tokens, conditioning, adaLN modulations, head), the residual stream's
width replicated (all-gathered from the fsdp-sharded weights), the MLP hidden widths over tensor."""


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The ImageNet-256 config for `variant` ("" = the paper's setting, "tiny")."""
    size, _ = parse_variant("imagenet256", variant, SIZES, "full")
    config = ml_collections.ConfigDict()
    config.seed = 2021  # root PRNG seed (the reference tools' default)

    config.data = ml_collections.ConfigDict()
    config.data.name = "imagenet_latents"  # SD-VAE latents of ImageNet-256 (§4.8)
    config.data.source = "files"  # "files" (prepared directory) or "synthetic" (tests)
    config.data.path = ""  # the prepared directory (index.json + ArrayRecord shards, or .npy)
    config.data.num_synthetic = 256  # latents of the synthetic source
    config.data.include_ids = False  # ArrayRecord batches also carry example ids (tests)

    config.model = ml_collections.ConfigDict()
    config.model.name = "gm_dit"  # GM-DiT (§6.1) + SpectrumMLP (§6.3) in one module
    config.model.num_layers = 28  # XL: 28 adaLN-Zero blocks
    config.model.hidden_size = 1152  # XL: D = 16 heads x 72
    config.model.num_heads = 16  # attention heads
    config.model.patch_size = 2  # /2: 32x32 latents -> 256 tokens
    config.model.in_channels = 4  # latent channels
    config.model.sample_size = 32  # latent H = W
    config.model.num_gaussians = 8  # K
    config.model.num_classes = 1000  # ImageNet classes; label 1000 is the null label
    config.model.logstd_inner_dim = 1024  # hidden width of the log-std head
    config.model.mlp_ratio = 4  # block MLP hidden = 4D
    config.model.mean_only = False  # GM head (not the flow-matching baseline)
    config.model.dtype = "bfloat16"  # compute dtype; parameters and all GM math stay float32
    config.model.remat = True  # gradient checkpointing per block (§6.1 "Other")
    config.model.remat_policy = "full"  # with remat: "full" | "save_linear_inputs" (gm_dit)
    config.model.scan_blocks = True  # stacked blocks under nnx.scan (one compiled block)

    config.model.spectrum_net = ml_collections.ConfigDict()
    config.model.spectrum_net.enabled = True  # SpectrumMLP: spectral loss and spectral sampling
    config.model.spectrum_net.base_size = (4, 32, 32)  # (C, H0, W0)
    config.model.spectrum_net.layers = (64, 8)  # hidden widths

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 200_000  # training iterations
    config.train.batch_size = 4096  # global batch
    config.train.trans_ratio = 0.5  # r: t_low = t_high (1 - r) (§4.1)
    config.train.weight_scale = 2.0  # loss multiplier (§4.2)
    config.train.t_sampler = "logit_normal"  # training t sampler (§1.3)
    config.train.logit_normal_mean = 0.0  # logit-normal location
    config.train.logit_normal_std = 1.0  # logit-normal scale
    config.train.shift = 1.0  # timestep shift (§1.2)
    config.train.prob_class = 0.9  # keep a label with this probability, else null (§4.4)
    config.train.spectral_loss_weight = 1.0  # w_spec (§4.3)
    config.train.log_every = 100  # steps between host syncs
    config.train.max_consecutive_skips = 100  # skipped (non-finite) steps in a row that stop a run

    config.train.optimizer = ml_collections.ConfigDict()
    config.train.optimizer.lr = 2e-4  # AdamW learning rate (§4.6)
    config.train.optimizer.b1 = 0.9  # Adam beta_1
    config.train.optimizer.b2 = 0.95  # Adam beta_2
    config.train.optimizer.eps = 1e-8  # Adam epsilon
    config.train.optimizer.weight_decay = 0.05  # decoupled weight decay, none on biases
    config.train.optimizer.warmup_iters = 1000  # linear warm-up iterations
    config.train.optimizer.warmup_ratio = 0.001  # lr_0 = 0.001 lr
    config.train.optimizer.grad_clip_norm = 10.0  # global-norm clip
    config.train.optimizer.clip_begin = 1000  # clipping and the non-finite skip from iteration 1000
    config.train.optimizer.skip_nonfinite = True  # skip steps with a non-finite grad norm

    config.train.ema = ml_collections.ConfigDict()
    config.train.ema.policy = "rampup"  # EMA beta policy (§4.7)
    config.train.ema.gamma = 7.0  # karras only (unused)
    config.train.ema.ema_kimg = 30000.0  # half-life cap in kimg
    config.train.ema.ema_rampup = 0.05  # half-life as a fraction of images seen
    config.train.ema.batch_size = config.train.get_ref("batch_size")  # images per iteration
    config.train.ema.eps = 1e-8  # floor of the half-life
    config.train.ema.beta = 0.999  # fixed only (unused)

    config.sample = ml_collections.ConfigDict()
    config.sample.gm_solvers = ("gm_ode_2",)  # evaluation row (sampler-row grammar, solvers.config)
    config.sample.gm_nfes = (16,)  # outer steps
    config.sample.guidance_scales = (0.04,)  # probabilistic guidance w
    config.sample.baseline_solvers = ("euler",)  # rows for a mean-only model
    config.sample.baseline_nfes = (32,)  # baseline steps
    config.sample.cfg_scales = (1.5,)  # baseline CFG scale
    config.sample.gm_ode_substeps_total = 128  # S = ceil(128 / NFE): 8 substeps at 16 steps
    config.sample.orthogonal_guidance = 1.0  # orthogonal projection strength
    config.sample.shift = 1.0  # inference timestep shift
    config.sample.batch_size = 250  # latents per jitted sampler call

    config.eval = ml_collections.ConfigDict()
    config.eval.enabled = True  # evaluate after training
    config.eval.num_samples = 50_000  # latents per setting (§7)
    config.eval.save_samples = 1000  # latents per setting kept in samples.npz (float16)
    config.eval.metrics_file = "metrics.json"  # written atomically in the workdir
    config.eval.samples_file = "samples.npz"  # saved latents, written atomically
    config.eval.every_steps = 10_000  # steps between evaluations during training (0 = off)
    config.eval.periodic_samples = 256  # latents of each evaluation during training

    config.profile = ml_collections.ConfigDict()  # jax.profiler trace into workdir/profile
    config.profile.skip_steps = 5  # steps of this invocation before the trace (compile, warm-up)
    config.profile.num_steps = 0  # steps traced; 0 = profiling off
    config.profile.all_hosts = False  # trace every process (True) or process 0 only

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000  # save interval (and always at the end)
    config.checkpoint.max_to_keep = 1  # newest checkpoints kept
    config.checkpoint.async_save = True  # write checkpoints in the background
    config.checkpoint.restart = False  # True: move existing checkpoints aside, train from step 0
    config.checkpoint.restore_from = ""  # another run's checkpoint dir to take weights from

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # pure data-parallel axis size (parameters replicated along it)
    config.mesh.fsdp = -1  # parameter-sharding (FSDP) axis size (-1: all remaining devices)
    config.mesh.tensor = 1  # tensor-parallel axis size
    config.mesh.rules = MESH_RULES  # parameter logical axis -> mesh axis rules (see MESH_RULES)
    config.mesh.activation_rules = ACTIVATION_RULES  # activation constraints (ACTIVATION_RULES)
    config.mesh.dcn_data = 1  # slices (or processes) along data over the data-centre network
    config.mesh.dcn_fsdp = 1  # slices (or processes) along fsdp over the data-centre network

    config.distributed = ml_collections.ConfigDict()  # explicit jax.distributed settings; empty:
    config.distributed.coordinator_address = ""  # env vars / SLURM / TPU detection, or 1 process
    config.distributed.num_processes = 1  # processes in the job (with coordinator_address)
    config.distributed.process_id = 0  # this process (with coordinator_address)

    if size == "tiny":
        config.data.source = "synthetic"
        config.data.num_synthetic = 64
        config.model.num_layers = 2
        config.model.hidden_size = 32
        config.model.num_heads = 2
        config.model.sample_size = 8
        config.model.logstd_inner_dim = 16
        config.model.remat = False
        config.model.scan_blocks = False  # XLA:CPU: no collectives inside a while loop
        config.model.spectrum_net.base_size = (4, 8, 8)
        config.train.num_steps = 1
        config.train.batch_size = 8
        config.train.log_every = 1
        config.train.optimizer.warmup_iters = 2
        config.train.optimizer.clip_begin = 0
        config.train.ema.ema_kimg = 1.0
        config.sample.gm_solvers = ("gm_sde_2",)
        config.sample.gm_nfes = (2,)
        config.sample.guidance_scales = (0.3,)
        config.sample.batch_size = 8
        config.eval.num_samples = 8
        config.eval.save_samples = 4
        config.checkpoint.every_steps = 1
    return config

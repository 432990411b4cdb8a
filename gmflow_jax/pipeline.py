"""GMFlowPipeline: class-conditional image sampling with a GM-DiT (`docs/math.md` §5.2, §5.7, §7 defaults).

```python
from gmflow_jax.pipeline import GMFlowPipeline

pipe = GMFlowPipeline.from_official("gmflow_imagenet_k8_ema")  # raw diffusers folder or converted
images = pipe(pipe.get_label_ids(["jay", "magpie"]), guidance_scale=0.45, num_steps=32,
              num_substeps=4, solver="gm_ode_2", seed=42)  # uint8 [2, 256, 256, 3]
```

==============================  ==============================================================
name                            what it is
==============================  ==============================================================
`GMFlowPipeline.from_official`  the official checkpoint (`gmflow_jax.interop`): a folder written
                                by `tools/convert_official_checkpoint.py`, or the raw diffusers
                                folder (converted in memory)
`GMFlowPipeline.from_checkpoint`  EMA parameters of one of our training runs (orbax; the newest
                                step, or `step=`) with the run's `config.json` (below)
`GMFlowPipeline.__call__`       labels (ints or ImageNet words) -> uint8 images `[N, H, W, C]`
                                (decoded latents, or a pixel model's samples), float32 latents
                                `[N, h, w, C]` on request, or PIL images on request
`get_label_ids`                 ImageNet words -> class indices (any comma-separated synonym of
                                `gmflow_jax/data/imagenet_classes.txt`, case-insensitive)
==============================  ==============================================================

Solvers (`solver=`): a sampler row of the grammar in `gmflow_jax.solvers.config` (one spelling
everywhere; the older `gm_ode2` / `gm_sde2` are accepted as `gm_ode_2` / `gm_sde_2`), sampled by the
one sampling driver (`gmflow_jax.sampling.driver`) over this process's devices:

=========================  ===================================================================
row                        sampler
=========================  ===================================================================
`gm_ode_2`, `gm_ode`       GM-ODE 2 / GM-ODE: Euler on the GM mean, 2nd / 1st order (§5.5),
                           `num_substeps` analytic substeps (§5.6); default ceil(128 /
                           num_steps) (4 for 32 steps, 16 for 8: the §7 evaluation pairs);
                           `_nosub` rows take 1
`gm_sde_2`, `gm_sde`       GM-SDE 2 / GM-SDE: GM-SDE scheduler in sample mode; spectral
                           sampling (§5.7) when a SpectrumMLP is loaded, unless `_nospec`
`euler`, `ddpm_small`,     flow-matching baselines on the (GM) mean (§5.1, §5.9), with classic
`ddpm_large`,              CFG; the only rows of a mean-only (K = 1 `mean_only`) baseline model
`dpmpp_2m`,
`dpmpp_2m_sde`
=========================  ===================================================================

Models: a GM-DiT with a GM head (GMFlow) or a mean-only head (the flow-matching baseline), on
latents (ImageNet: a VAE decodes them) or on pixels (the digits: `pixel_space`, the samples are the
images). Guidance follows the row (the grammar of `solvers.config`): GM rows take probabilistic
guidance (§5.3), w in [0, 1), 0 disables it, default 0.45; baseline rows take classic CFG (§5.9),
w >= 0, active when w > 1, default 1 (unguided). The default row is `gm_ode_2` for a GM model and
`euler` for a mean-only one. The unconditional label is `num_classes` (the null row of the label
table).

Outputs (`output_type`): "auto" = uint8 images `[N, H, W, C]` for a pixel model or a latent model
with a VAE, else latents; "images"; "latents" (float32, a latent model's own samples); "pil" (a
list of `PIL.Image`s: RGB, or "L" for one channel). Random streams: with
`key = PRNGKey(seed)` and `noise_key, sample_key = split(key)`, the initial noise is
`normal(noise_key, [N, h, w, C])` for the whole batch, and chunk j of a `batch_size`-chunked call
uses `fold_in(sample_key, j)` (one chunk: j = 0; `sampling.streams.batch_streams`); GM-ODE results
are therefore independent of `batch_size`, GM-SDE results are not.

`from_checkpoint(path, step=None)`: `path` is a training workdir holding `checkpoints/` or the
checkpoint directory itself (numbered orbax steps, item "state" = the `TrainState`); `step` picks
one step (default the newest intact one). The model comes from the run's `config.json` in the
workdir (or the checkpoint directory), else from the resolved run config `run_config.json` that
every training run writes (its `model` section, e.g. a mean-only baseline's), or from `config=` (a
dict or a path). `config.json`:

```json
{
  "model": {"num_layers": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2,
            "in_channels": 4, "sample_size": 32, "num_gaussians": 8, "num_classes": 1000,
            "logstd_inner_dim": 1024, "scan_blocks": false},
  "spectrum_net": {"base_size": [4, 32, 32], "layers": [64, 8]},
  "vae": "vae"
}
```

`model` holds `GMDiTConfig` fields (omitted ones take their defaults); `spectrum_net` (optional)
adds the SpectrumMLP. The checkpoint's `ema_params` is the state of the `ImageDenoiser` that
`gmflow_jax.models.builder.build_model` builds from this config (as training does):
`{"denoiser": <GM-DiT state>, "spectrum_net": <SpectrumMLP state>}`, or `{"denoiser": <GM-DiT
state>}` without `spectrum_net`. `vae` (optional) is a VAE folder (converted, or diffusers),
relative to the config file and inside its folder (an absolute path, `..` out of it or a symlink
out of it is refused; pass `vae=` to load a VAE from elsewhere). The SpectrumMLP computes in
float32 whatever the `dtype` (`gmflow_jax.models.image_denoiser`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from gmflow_jax import guidance, solvers
from gmflow_jax.checkpoint import restore_weights
from gmflow_jax.interop.converted_folder import load_official, load_vae_folder
from gmflow_jax.interop.folder_files import contained_path, read_json
from gmflow_jax.models.builder import MODEL_NAMES, abstract_model, model_config_from_pipeline_config
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.models.gm_dit import GMDiT
from gmflow_jax.models.image_denoiser import ImageDenoiser
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.vae import AutoencoderKL, latents_to_images, pixels_to_uint8
from gmflow_jax.run_config import RUN_CONFIG_FILE
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import batch_streams

Array = jax.Array

DEFAULT_SOLVER = "gm_ode_2"
"""Pipeline/README default sampler row of a GM model (§7)."""

DEFAULT_BASELINE_SOLVER = "euler"
"""Default sampler row of a mean-only (flow-matching baseline) model."""

DEFAULT_GUIDANCE_SCALE = 0.45
"""Pipeline/README default probabilistic guidance scale of the GM rows (§7)."""

DEFAULT_CFG_SCALE = 1.0
"""Default classic CFG scale of the baseline rows (1 = unguided; §5.9)."""

PIXEL_CHANNELS = (1, 3)
"""Channel counts of a pixel-space model (grey or RGB); a VAE's latents have 4 (§4.8)."""

DEFAULT_NUM_STEPS = 32
"""Pipeline/README default number of outer steps (§7)."""

OUTPUT_TYPES = ("auto", "images", "latents", "pil")
"""`output_type` values (module docstring)."""

CONFIG_NAME = "config.json"
"""File name of a training run's pipeline config (module docstring)."""

CHECKPOINT_SUBDIR = "checkpoints"
"""Sub-folder of a workdir holding the orbax checkpoints (as `train.loop` writes them)."""

IMAGENET_CLASSES_FILE = "imagenet_classes.txt"
"""The 1000 ImageNet-1k class names in `gmflow_jax/data/`, index = line number."""


# --------------------------------------------------------------------------------------------
# ImageNet class names
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _imagenet_class_names() -> tuple[str, ...]:
    """The shipped class-name file as a tuple (cached)."""
    resource = importlib.resources.files("gmflow_jax.data").joinpath(IMAGENET_CLASSES_FILE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"gmflow_jax/data/{IMAGENET_CLASSES_FILE} is missing from this installation (the "
            "package data was not installed); reinstall gmflow_jax, or pass integer labels"
        )
    text = resource.read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise ValueError(f"{IMAGENET_CLASSES_FILE} must list 1000 classes, found {len(names)}")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (standard synset order), e.g. index 0 "tench, Tinca tinca"."""
    return list(_imagenet_class_names())


def _normalize(word: str) -> str:
    """Case- and whitespace-insensitive form of a class name."""
    return " ".join(word.split()).lower()


@functools.lru_cache(maxsize=8)
def _synonym_index(class_names: tuple[str, ...]) -> dict[str, tuple[tuple[int, bool], ...]]:
    """Normalized synonym -> ((class id, is the class's first name), ...)."""
    index: dict[str, list[tuple[int, bool]]] = {}
    for i, name in enumerate(class_names):
        for j, synonym in enumerate(name.split(",")):
            key = _normalize(synonym)
            if key:
                index.setdefault(key, []).append((i, j == 0))
    return {k: tuple(v) for k, v in index.items()}


def label_ids_from_words(words: str | Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Class indices of `words`: each must equal (case-insensitively) one comma-separated synonym.

    A synonym shared by several classes resolves to the one class whose first name it is, else
    raises (e.g. "crane": the bird 134 or the machine 517). Unknown words raise with close matches.
    """
    if isinstance(words, str):
        words = [words]
    names = tuple(class_names)
    index = _synonym_index(names)
    ids = []
    for word in words:
        if not isinstance(word, str):
            raise ValueError(f"words must be strings, got {word!r} ({type(word).__name__})")
        entries = index.get(_normalize(word))
        if not entries:
            close = difflib.get_close_matches(_normalize(word), list(index), n=5, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else "; see the pipeline's class_names"
            raise ValueError(f"unknown class name {word!r}{hint}")
        candidates = sorted({i for i, _ in entries})
        primary = sorted({i for i, first in entries if first})
        if len(candidates) > 1 and len(primary) != 1:
            listed = ", ".join(f"{i} ({names[i]!r})" for i in candidates)
            raise ValueError(
                f"class name {word!r} is ambiguous: {listed}; pass the class index or a more "
                "specific name"
            )
        ids.append(candidates[0] if len(candidates) == 1 else primary[0])
    return ids


# --------------------------------------------------------------------------------------------
# The jitted decoder
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: Array) -> Array:
    """§4.8 latents -> uint8 images with the VAE `(graphdef, state)`."""
    return latents_to_images(nnx.merge(graphdef, state), latents)


@jax.jit
def _to_uint8(pixels: Array) -> Array:
    """A pixel-space model's samples (about [-1, 1]) -> uint8 images (round half up)."""
    return pixels_to_uint8(pixels)


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (Python or NumPy)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _check_positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1, else ValueError naming `name`."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class GMFlowPipeline:
    """A GM-DiT (GM or mean-only head; + optional SpectrumMLP and VAE): class labels -> samples."""

    def __init__(
        self,
        model: GMDiT,
        spectrum_net: SpectrumMLP | None = None,
        vae: AutoencoderKL | None = None,
        *,
        class_names: Sequence[str] | None = None,
        pixel_space: bool | None = None,
    ):
        """Wrap loaded networks; `class_names` defaults to ImageNet's for a 1000-class model.

        The GM-DiT and the (float32) SpectrumMLP become one `ImageDenoiser`; `params` is its
        state and `_denoiser` / `_spectrum` its `models.denoiser.network_functions`.
        `pixel_space`: whether the model samples images directly (None: without a VAE, a model
        with 1 or 3 channels, `PIXEL_CHANNELS`; with a VAE it is a latent model).
        """
        if not isinstance(model, GMDiT):
            raise ValueError(
                f"model must be a GMDiT (the pipeline samples GM-DiT image models), got "
                f"{type(model).__name__}; a 2-D toy MLP is sampled by its task "
                "(gmflow_jax.tasks.checkerboard) or solvers.sample"
            )
        self.config = model.config
        self.mean_only = bool(model.config.mean_only)
        if self.mean_only and spectrum_net is not None:
            raise ValueError(
                "a mean_only model has no GM to sample spectrally; pass no spectrum_net"
            )
        c = self.config.in_channels
        if vae is not None and vae.config.latent_channels != c:
            raise ValueError(
                f"vae latent_channels={vae.config.latent_channels} differs from the model's "
                f"in_channels={c}"
            )
        if pixel_space is None:
            pixel_space = vae is None and c in PIXEL_CHANNELS
        if pixel_space and vae is not None:
            raise ValueError("pixel_space=True: a pixel-space model has no VAE; pass vae=None")
        self.pixel_space = bool(pixel_space)
        self.model = ImageDenoiser(model, spectrum_net)
        self._denoiser, self._spectrum = network_functions(self.model)
        self.params: nnx.State = nnx.split(self.model)[1]
        self._vae = nnx.split(vae) if vae is not None else None
        if class_names is not None and len(class_names) != self.config.num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries, the model has "
                f"{self.config.num_classes} classes"
            )
        self._class_names = list(class_names) if class_names is not None else None
        self._driver: SamplingDriver | None = None

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_official(
        cls,
        path: str,
        *,
        variant: str | None = None,
        dtype: Any = "float32",
        scan_blocks: bool = True,
        with_vae: bool = True,
    ) -> GMFlowPipeline:
        """The official checkpoint: a converted folder, or the raw diffusers folder (converted here).

        `variant` picks the raw weights file ("bf16": `diffusion_pytorch_model.bf16.safetensors`),
        `dtype` the compute dtype (parameters stay float32), `scan_blocks` the block layout.
        """
        models = load_official(
            path, variant=variant, scan_blocks=scan_blocks, dtype=dtype, with_vae=with_vae
        )
        return cls(models.transformer, models.spectrum_net, models.vae)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        step: int | None = None,
        config: Mapping[str, Any] | str | None = None,
        vae: AutoencoderKL | str | None = None,
        dtype: Any | None = None,
    ) -> GMFlowPipeline:
        """EMA parameters of one of our training runs (module docstring): step `step`, or the
        newest intact one.

        `path`: a workdir holding `checkpoints/`, or the checkpoint directory. `config`: the run's
        pipeline config (a dict or a JSON path; default `config.json` in the workdir, then in the
        checkpoint directory, then the `model` of the workdir's `run_config.json`). `vae`: a
        module or a VAE folder, overriding the config's entry. `dtype` overrides the compute dtype.
        """
        if step is not None and (not _is_int(step) or step < 0):
            raise ValueError(f"step={step!r} must be a checkpoint step (an integer >= 0) or None")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint path {path!r} is not a directory")
        sub = os.path.join(path, CHECKPOINT_SUBDIR)
        ckpt_dir, workdir = (sub, path) if os.path.isdir(sub) else (path, os.path.dirname(path))
        config_dir = workdir
        run_model = None
        if config is None:
            candidates = [os.path.join(workdir, CONFIG_NAME), os.path.join(ckpt_dir, CONFIG_NAME)]
            found = [p for p in candidates if os.path.isfile(p)]
            run_file = os.path.join(workdir, RUN_CONFIG_FILE)
            if found:
                config = found[0]
            elif os.path.isfile(run_file):
                run_model = _run_config_model(run_file)
                config = {}
            else:
                raise FileNotFoundError(
                    f"no run config found: looked for {[*candidates, run_file]}; write the run's "
                    "config.json (see gmflow_jax.pipeline's docstring) or pass config="
                )
        config_file = None
        if isinstance(config, str):
            config_file, config_dir = config, os.path.dirname(os.path.abspath(config))
            config = read_json(config)
        if vae is None and isinstance(config, Mapping) and config.get("vae"):
            # Why contained: the config may come with a downloaded run; its `vae` must not point
            # outside the run's folder (pass `vae=` to load one from elsewhere). Checked before
            # the checkpoint is restored.
            where = f"{config_file}: vae" if config_file else "config['vae']"
            vae = contained_path(config_dir, config["vae"], where)
        overrides = {"remat": False}
        if dtype is not None:
            overrides["dtype"] = dtype
        if run_model is not None:
            model_cfg = {**run_model, **overrides}
        else:
            model_cfg = model_config_from_pipeline_config(config, **overrides)
        graphdef, abstract = nnx.split(abstract_model(model_cfg))
        weights, _ = restore_weights(ckpt_dir, {"ema_params": abstract}, step=step)
        model = nnx.merge(graphdef, weights["ema_params"])
        if isinstance(vae, str):
            vae = load_vae_folder(vae, dtype=model.config.dtype)
        return cls(model.denoiser, model.spectrum_net, vae)

    # -- labels -------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes: the given ones, ImageNet's for a 1000-class model, else None."""
        if self._class_names is None and self.config.num_classes == 1000:
            self._class_names = imagenet_class_names()
        return self._class_names

    def get_label_ids(self, words: str | Sequence[str]) -> list[int]:
        """Class indices of ImageNet words (any comma-separated synonym, case-insensitive)."""
        if self.class_names is None:
            raise ValueError(
                f"this model has {self.config.num_classes} classes and no class_names; pass "
                "integer labels"
            )
        return label_ids_from_words(words, self.class_names)

    def _labels(self, class_labels: Any) -> np.ndarray:
        """Ints and/or words -> int32 labels `[N]`, checked against the class range."""
        if isinstance(class_labels, np.ndarray | jax.Array):
            class_labels = np.asarray(class_labels).reshape(-1).tolist()
        elif isinstance(class_labels, str) or _is_int(class_labels):
            class_labels = [class_labels]
        class_labels = list(class_labels)
        if not class_labels:
            raise ValueError("class_labels is empty; pass at least one label")
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids([label]))
            elif _is_int(label) and 0 <= label < self.config.num_classes:
                ids.append(int(label))
            else:
                raise ValueError(
                    f"class label {label!r} must be a class name or an integer in "
                    f"[0, {self.config.num_classes})"
                )
        return np.asarray(ids, np.int32)

    # -- sampling -----------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """`(h, w, C)` of one latent."""
        s = self.config.sample_size
        return (s, s, self.config.in_channels)

    @property
    def has_vae(self) -> bool:
        """Whether a VAE is loaded (then the default output is its decoded uint8 images)."""
        return self._vae is not None

    @property
    def vae_parts(self) -> tuple[nnx.GraphDef, nnx.State] | None:
        """`(graphdef, state)` of the loaded VAE, or None."""
        return self._vae

    @property
    def default_solver(self) -> str:
        """`gm_ode_2` for a GM model, `euler` for a mean-only baseline."""
        return DEFAULT_BASELINE_SOLVER if self.mean_only else DEFAULT_SOLVER

    def default_guidance_scale(self, solver: str | None = None) -> float:
        """0.45 (probabilistic) for a GM row, 1.0 (CFG, unguided) for a baseline row."""
        row = solvers.parse_sampler(self.default_solver if solver is None else solver)
        return DEFAULT_GUIDANCE_SCALE if row.is_gm else DEFAULT_CFG_SCALE

    def solver_config(
        self,
        solver: str | None = None,
        num_steps: int = DEFAULT_NUM_STEPS,
        num_substeps: int | None = None,
        guidance_scale: float | None = None,
        *,
        orthogonal_guidance: float = 1.0,
        shift: float = 1.0,
        spectral: bool | None = None,
    ) -> solvers.SolverConfig:
        """The validated `SolverConfig` a call with these arguments runs (module docstring).

        `solver` None = `default_solver`; `guidance_scale` None = `default_guidance_scale(row)`.
        """
        solver = self.default_solver if solver is None else solver
        row = solvers.parse_sampler(solver)
        if self.mean_only and row.is_gm:
            raise ValueError(
                f"solver={solver!r} needs a GM model, and this is a mean-only flow-matching "
                f"baseline: use a baseline row ({', '.join(solvers.BASELINE_SOLVERS)}) with a CFG "
                "guidance_scale (active when > 1)"
            )
        num_steps = _check_positive_int("num_steps", num_steps)
        if num_substeps is not None:
            num_substeps = _check_positive_int("num_substeps", num_substeps)
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale(row)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number")
        w = float(guidance_scale)
        if row.is_gm and not 0.0 <= w < 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} must be in [0, 1) for the GM row {solver!r} "
                "(probabilistic guidance; 0 disables it; it is not a CFG scale)"
            )
        guidance.check_guidance_scale(w, row.guidance)  # baseline rows: CFG, w >= 0
        if spectral is None:
            spectral = row.solver == "gm_sde" and row.spectral and self._spectrum is not None
        if spectral and self._spectrum is None:
            raise ValueError("spectral=True needs a SpectrumMLP, and none is loaded")
        if spectral and (row.solver != "gm_sde" or not row.spectral):
            raise ValueError(f"spectral=True needs a GM-SDE solver, got solver={solver!r}")
        cfg = solvers.row_solver_config(
            row,
            num_steps,
            w,
            null_label=self.config.num_classes,
            num_substeps=num_substeps,
            shift=float(shift),
            orthogonal_guidance=float(orthogonal_guidance),
            has_spectrum=bool(spectral),
        )
        return cfg

    def sampling_driver(
        self, mesh: Any = None, compiler_options: Mapping[str, Any] | None = None
    ) -> SamplingDriver:
        """A sampling driver of this pipeline's networks on `mesh` (default: this process's
        devices), with XLA `compiler_options` for its chunk program."""
        return SamplingDriver(
            self._denoiser,
            self.params,
            self._spectrum,
            mesh=mesh,
            compiler_options=compiler_options,
        )

    @property
    def driver(self) -> SamplingDriver:
        """The sampling driver of this pipeline's networks over this process's devices (lazy)."""
        if self._driver is None:
            self._driver = self.sampling_driver()
        return self._driver

    def __call__(
        self,
        class_labels: Any,
        guidance_scale: float | None = None,
        num_steps: int = DEFAULT_NUM_STEPS,
        num_substeps: int | None = None,
        solver: str | None = None,
        seed: int = 0,
        *,
        output_type: str = "auto",
        batch_size: int | None = None,
        orthogonal_guidance: float = 1.0,
        shift: float = 1.0,
        spectral: bool | None = None,
    ) -> np.ndarray | list[Image.Image]:
        """Sample one image per label (module docstring: models, guidance, outputs).

        `class_labels`: an int, a word, or a sequence of ints / ImageNet words. `solver` None =
        `default_solver`; `guidance_scale` None = the row's default (probabilistic w in [0, 1)
        for GM rows, CFG w >= 0 for baseline rows); `num_substeps` None = the solver's default;
        `batch_size` splits the batch into equal jitted chunks (the last one padded); `spectral`
        None = spectral sampling for GM-SDE when a SpectrumMLP is loaded. `output_type`: "auto",
        "images", "latents" or "pil".
        """
        labels = self._labels(class_labels)
        cfg = self.solver_config(
            solver,
            num_steps,
            num_substeps,
            guidance_scale,
            orthogonal_guidance=orthogonal_guidance,
            shift=shift,
            spectral=spectral,
        )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")
        latent_model = not self.pixel_space
        if output_type in ("images", "pil") and latent_model and self._vae is None:
            raise ValueError(
                f"output_type={output_type!r} needs a VAE to decode this latent model's samples, "
                "and none is loaded; load one (vae=) or ask for output_type='latents'"
            )
        if output_type == "latents" and self.pixel_space:
            raise ValueError(
                "output_type='latents': this pixel-space model has no latents; its samples are "
                "the images (output_type='images', or 'auto')"
            )
        if not _is_int(seed):
            raise ValueError(f"seed={seed!r} must be an integer")
        n = len(labels)
        chunk = n if batch_size is None else min(_check_positive_int("batch_size", batch_size), n)

        streams = batch_streams(jax.random.PRNGKey(int(seed)), n, chunk, self.latent_shape)
        w = self.default_guidance_scale(solver) if guidance_scale is None else guidance_scale
        scale = float(w) if cfg.guided else None
        samples = self.driver.sample(cfg, streams, n, labels, scale)
        if output_type == "latents" or (
            output_type == "auto" and latent_model and self._vae is None
        ):
            return samples
        if self.pixel_space:
            images = np.asarray(_to_uint8(jnp.asarray(samples)))
        else:
            graphdef, state = self._vae
            images = np.concatenate(
                [
                    np.asarray(
                        _decode(
                            graphdef, state, jnp.asarray(_pad_to(samples[s : s + chunk], chunk))
                        )
                    )
                    for s in range(0, n, chunk)
                ]
            )[:n]
        if output_type == "pil":
            return [to_pil(image) for image in images]
        return images


def to_pil(image: np.ndarray) -> Image.Image:
    """A uint8 image `[H, W, C]` as a `PIL.Image`: "L" for one channel, "RGB" for three."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in PIXEL_CHANNELS:
        raise ValueError(
            f"to_pil needs a uint8 image [H, W, 1 or 3], got {image.dtype} {image.shape}"
        )
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _run_config_model(path: str) -> dict[str, Any]:
    """The `model` section of a run's resolved `run_config.json`, checked to be a GM-DiT."""
    record = read_json(path)
    model = record.get("model") if isinstance(record, Mapping) else None
    if not isinstance(model, Mapping):
        raise ValueError(f"{path}: no 'model' section; the run config is damaged")
    name = model.get("name")
    if name != "gm_dit":
        raise ValueError(
            f"{path}: model.name={name!r}; GMFlowPipeline samples GM-DiT image models (digits, "
            f"ImageNet; one of {MODEL_NAMES} is 'gm_dit'). A 2-D toy MLP run (the checkerboard) "
            "is evaluated by rerunning its `python -m gmflow_jax.main` command (a finished run "
            "goes straight to evaluation) or sampled with gmflow_jax.solvers.sample"
        )
    return dict(model)


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis of `x` to `size` by repeating its first rows (one compiled shape)."""
    if len(x) == size:
        return x
    return np.concatenate([x, x[np.arange(size - len(x)) % len(x)]])

"""Evaluator of generated 8x8 / 16x16 digits (issue 4; the digits analogue of the §7 metrics).

A small CNN classifier is trained on the 1497 training digits of `gmflow_jax.data.digits` and then
scores generated images [N, S, S, 1] in [-1, 1] against requested labels [N]:

* `accuracy`: the fraction the classifier assigns to the requested label ("conditional
  precision", the digits stand-in for the paper's class-conditional Precision);
* `fd`: the Fréchet distance (`gmflow_jax.eval.frechet`) between the classifier's penultimate
  features of the images and those of the 300 held-out real digits (the stand-in for FID);
* `precision` / `recall`: improved precision and recall (k = 3, Kynkäänniemi et al. 2019; the
  paper's Precision / Recall, `gmflow_jax.eval.image_metrics.precision_recall`) of the features
  against the manifold of the 1497 training digits' features; unlike accuracy, they do not
  saturate at 1 when guidance pushes samples off the data manifold;
* saturation: the mean |pixel| and the fraction of pixels with |x| > 0.98, next to the same
  numbers for the held-out digits (a simple stand-in for the paper's Saturation, which is
  measured relative to real data).

Generated images are clipped to [-1, 1] before the classifier and the clipped statistics. NaN
pixels become 0 and +-inf become +-1 first; `nonfinite_rate` reports the share of images that had
any such pixel.

Classifier: Conv 3x3 (1 -> 32, stride S/8, to 8x8) GELU, Conv 3x3 stride 2 (32 -> 64, to 4x4)
GELU, flatten, Linear -> 128 GELU (the features), Linear -> 10 (the logits). AdamW with cosine
decay, 300 steps of batch 128 (about 26 epochs) on the training split, deterministic for a seed;
about 98% held-out accuracy at 8x8 and 97% at 16x16. Weights are cached as one npz file per
configuration in a work directory (written atomically, checked against the stored configuration
when read).

The Fréchet distance has a finite-sample floor that grows with the feature dimension (128) and
shrinks with N: the 1497 real training digits score `real_fd_train` (about 5.6) against the 300
held-out ones. Compare FDs at equal N only.

=============================  ===============================================================
name                           what it is
=============================  ===============================================================
`DigitsClassifier`             the CNN (nnx.Module): `features(x)`, `__call__(x)` -> logits
`classifier_config`            the configuration (dict) that names and validates a cache file
`train_classifier`             train on a `DigitsData` split -> (model, held-out accuracy)
`load_or_train_classifier`     the cached classifier of a work directory, trained if absent
`saturation_statistics`        mean |x| and fraction of |x| > 0.98 of images
`DigitsEvaluator`              features / logits (jitted, batched) and `evaluate` -> dict
=============================  ===============================================================
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmflow_jax.atomic_file import set_aside, write_npz_atomic
from gmflow_jax.data.digits import (
    HELD_OUT_PER_CLASS,
    IMAGE_SIZES,
    NUM_CLASSES,
    SPLIT_SEED,
    DigitsData,
    load_digits,
)
from gmflow_jax.eval.frechet import feature_statistics, frechet_distance
from gmflow_jax.eval.image_metrics import PR_NEIGHBOURHOOD, precision_recall
from gmflow_jax.paths import as_path, join, make_dirs

Array = jax.Array

CACHE_FORMAT_VERSION = 2
"""Bumped whenever the architecture or training changes in a way the configuration does not show."""

SATURATION_THRESHOLD = 0.98
"""A pixel counts as saturated when |x| > SATURATION_THRESHOLD."""

CONV_CHANNELS = (32, 64)
"""Output channels of the two 3x3 convolutions (strides S/8 and 2: S x S -> 8x8 -> 4x4)."""

FEATURE_DIM = 128
"""Width of the penultimate layer whose activations are the Fréchet features."""

TRAIN_STEPS = 300
"""Classifier training steps (about 26 epochs of the 1497 training images at batch 128)."""

TRAIN_BATCH_SIZE = 128
"""Classifier training batch size (batches from `DigitsData.batches`)."""

LEARNING_RATE = 3e-3
"""AdamW peak learning rate (cosine decay to 0 over training)."""

WEIGHT_DECAY = 1e-4
"""AdamW weight decay."""

EVAL_BATCH_SIZE = 512
"""Images per jitted classifier call in `DigitsEvaluator` (the last chunk is padded)."""


class DigitsClassifier(nnx.Module):
    """Small CNN on [B, S, S, 1] digits in [-1, 1]: two 3x3 convolutions, a 128-d layer, 10 logits."""

    def __init__(self, image_size: int, *, rngs: nnx.Rngs):
        """Build the layers for square images of side `image_size` (a multiple of 8)."""
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or image_size < 8
            or image_size % 8
        ):
            raise ValueError(f"image_size must be a Python int multiple of 8, got {image_size!r}")
        c1, c2 = CONV_CHANNELS
        self.image_size = image_size
        # The first convolution strides down to 8x8 (stride 1 at 8x8, 2 at 16x16), the second to 4x4.
        self.conv1 = nnx.Conv(1, c1, (3, 3), strides=image_size // 8, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=2, rngs=rngs)
        self.hidden = nnx.Linear(c2 * 4 * 4, FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def features(self, x: Array) -> Array:
        """Penultimate activations [B, 128] of images x [B, S, S, 1]."""
        h = jax.nn.gelu(self.conv1(x))
        h = jax.nn.gelu(self.conv2(h))
        return jax.nn.gelu(self.hidden(h.reshape(h.shape[0], -1)))

    def __call__(self, x: Array) -> Array:
        """Class logits [B, 10] of images x [B, S, S, 1]."""
        return self.head(self.features(x))


def _abstract_classifier(image_size: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and parameter shapes (jax.ShapeDtypeStruct leaves) of the classifier."""
    return nnx.split(nnx.eval_shape(lambda: DigitsClassifier(image_size, rngs=nnx.Rngs(0))))


def classifier_config(image_size: int, seed: int = 0) -> dict[str, Any]:
    """Everything that determines the trained weights (names the cache file, validated on load)."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "image_size": int(image_size),
        "seed": int(seed),
        "conv_channels": list(CONV_CHANNELS),
        "feature_dim": FEATURE_DIM,
        "steps": TRAIN_STEPS,
        "batch_size": TRAIN_BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "held_out_per_class": HELD_OUT_PER_CLASS,
        "split_seed": SPLIT_SEED,
    }


def _config_json(config: dict[str, Any]) -> str:
    """Canonical JSON text of a configuration (sorted keys)."""
    return json.dumps(config, sort_keys=True)


def _check_seed(seed) -> int:
    """Return seed as an int, raising ValueError unless it is an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a Python int >= 0, got {seed!r}")
    return int(seed)


def _accuracy(model: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose argmax logit equals the label."""
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, jnp.asarray(images))
    return float(np.mean(np.asarray(jnp.argmax(logits, axis=-1)) == labels))


def train_classifier(data: DigitsData, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train the CNN on data's training split; return it and its held-out accuracy (deterministic)."""
    seed = _check_seed(seed)
    key_init, key_data = jax.random.split(jax.random.key(seed))
    graphdef, _ = _abstract_classifier(data.image_size)
    params = jax.jit(
        lambda key: nnx.split(DigitsClassifier(data.image_size, rngs=nnx.Rngs(params=key)))[1]
    )(key_init)  # one compiled initializer instead of many eager random ops
    tx = optax.adamw(
        optax.cosine_decay_schedule(LEARNING_RATE, TRAIN_STEPS), weight_decay=WEIGHT_DECAY
    )

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # A Python loop of jitted steps: XLA:CPU runs convolutions inside lax.scan about 15x slower.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    batches = data.batches(key_data, TRAIN_BATCH_SIZE)
    for _ in range(TRAIN_STEPS):
        x, y = next(batches)
        params, opt_state = step(params, opt_state, x, y)
    model = nnx.merge(graphdef, params)
    return model, _accuracy(model, data.held_out_images, data.held_out_labels)


def _flat_params(model: DigitsClassifier) -> dict[str, np.ndarray]:
    """Parameters of model by path string (e.g. "['conv1']['kernel'].value") as numpy arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def classifier_cache_path(workdir: str, image_size: int, seed: int = 0) -> str:
    """Path of the cache file of a configuration: <workdir>/digits_classifier_<S>px_<hash>.npz."""
    text = _config_json(classifier_config(image_size, seed))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return join(workdir, f"digits_classifier_{int(image_size)}px_{digest}.npz")


def _load_cached(path: str, config: dict[str, Any]) -> tuple[DigitsClassifier, float] | None:
    """The classifier stored at path, or None when absent, stored for another configuration, or
    damaged (then the file is set aside with a warning, `atomic_file.set_aside`, and rebuilt)."""
    if not as_path(path).exists():
        return None
    try:
        return _read_cache(path, config)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        # Why these: a truncated or overwritten npz fails in zipfile (BadZipFile, EOFError, bad
        # CRC), numpy's header parser (ValueError) or a missing member (KeyError).
        set_aside(path, f"unreadable classifier cache: {type(err).__name__}: {err}")
        return None


def _read_cache(path: str, config: dict[str, Any]) -> tuple[DigitsClassifier, float] | None:
    """The classifier stored at path, or None when stored for another configuration."""
    # Read through the path layer (local or gs://); the file is small.
    with np.load(io.BytesIO(as_path(path).read_bytes()), allow_pickle=False) as stored:
        if "config" not in stored.files or str(stored["config"]) != _config_json(config):
            return None
        graphdef, abstract = _abstract_classifier(config["image_size"])
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        values = []
        for path_, leaf in leaves:
            name = "param:" + jax.tree_util.keystr(path_)
            if name not in stored.files or stored[name].shape != leaf.shape:
                return None
            values.append(jnp.asarray(stored[name], leaf.dtype))
        if not all(bool(jnp.isfinite(v).all()) for v in values):
            raise ValueError("non-finite parameters")
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
        return model, float(stored["held_out_accuracy"])


def load_or_train_classifier(
    workdir: str, image_size: int = 8, seed: int = 0
) -> tuple[DigitsClassifier, float]:
    """The classifier cached in workdir for (image_size, seed), trained and saved if not there.

    Returns (model, held-out accuracy). The cache file holds the parameters, the held-out accuracy
    and the configuration JSON; a file whose configuration or parameter shapes differ is ignored
    and overwritten; a damaged file is set aside as `<name>.damaged.<timestamp>` with a warning
    and rebuilt.
    """
    seed = _check_seed(seed)
    if isinstance(image_size, bool) or image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    config = classifier_config(image_size, seed)
    path = classifier_cache_path(workdir, image_size, seed)
    cached = _load_cached(path, config)
    if cached is not None:
        return cached
    model, accuracy = train_classifier(load_digits(image_size), seed)
    make_dirs(workdir)
    arrays = {"param:" + name: value for name, value in _flat_params(model).items()}
    arrays["config"] = np.array(_config_json(config))
    arrays["held_out_accuracy"] = np.array(accuracy, np.float64)
    write_npz_atomic(path, **arrays)
    return model, accuracy


def saturation_statistics(images) -> dict[str, float]:
    """Mean |x| and fraction of pixels with |x| > 0.98 of images (any shape, float64 sums).

    The threshold is compared in the images' own float type (float32 0.98 is not saturated).
    """
    x = np.abs(np.asarray(images))
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if x.size == 0:
        raise ValueError("images must not be empty")
    return {
        "mean_abs": float(x.mean(dtype=np.float64)),
        "frac_saturated": float(np.mean(x > x.dtype.type(SATURATION_THRESHOLD))),
    }


class DigitsEvaluator:
    """Scores generated digits with a trained `DigitsClassifier` against the held-out real digits.

    `features` and `logits` run the classifier jitted on chunks of EVAL_BATCH_SIZE images (numpy
    in and out); `evaluate` returns the metric dict described in the module docstring. The
    held-out feature statistics, accuracy and saturation are computed once, at construction.
    """

    def __init__(self, classifier: DigitsClassifier, data: DigitsData):
        """Wrap a trained classifier and the split whose held-out images are the reference."""
        if classifier.image_size != data.image_size:
            raise ValueError(
                f"classifier image_size {classifier.image_size} differs from the data's "
                f"{data.image_size}"
            )
        self.image_size = data.image_size
        self.data = data
        graphdef, state = nnx.split(classifier)
        self._state = state

        def apply(state, x):
            model = nnx.merge(graphdef, state)
            h = model.features(x)
            return h, model.head(h)

        self._apply = jax.jit(apply)
        held_features, held_logits = self._features_and_logits(data.held_out_images)
        self.real_mu, self.real_sigma = feature_statistics(held_features)
        self.real_accuracy = float(np.mean(held_logits.argmax(-1) == data.held_out_labels))
        self.real_saturation = saturation_statistics(data.held_out_images)
        self.train_features = self.features(data.train_images)
        train_mu, train_sigma = feature_statistics(self.train_features)
        self.real_fd_train = frechet_distance(train_mu, train_sigma, self.real_mu, self.real_sigma)
        self.real_precision, self.real_recall = precision_recall(self.train_features, held_features)

    @classmethod
    def from_workdir(cls, workdir: str, image_size: int = 8, seed: int = 0) -> DigitsEvaluator:
        """Evaluator with the classifier cached in workdir (trained there on first use)."""
        classifier, _ = load_or_train_classifier(workdir, image_size, seed)
        return cls(classifier, load_digits(image_size))

    def _check_images(self, images) -> np.ndarray:
        """Return images as float32 numpy [N, S, S, 1], raising ValueError on another shape."""
        images = np.asarray(images, np.float32)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 1) or images.shape[0] == 0:
            raise ValueError(f"images must have shape [N, {s}, {s}, 1], N >= 1, got {images.shape}")
        return images

    def _features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Features [N, 128] and logits [N, 10] (float32 numpy), jitted on fixed-size chunks."""
        images = self._check_images(images)
        n = images.shape[0]
        padded = -(-n // EVAL_BATCH_SIZE) * EVAL_BATCH_SIZE
        images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), np.float32)])
        features, logits = [], []
        for start in range(0, padded, EVAL_BATCH_SIZE):
            h, z = self._apply(self._state, jnp.asarray(images[start : start + EVAL_BATCH_SIZE]))
            features.append(np.asarray(h))
            logits.append(np.asarray(z))
        return np.concatenate(features)[:n], np.concatenate(logits)[:n]

    def features(self, images) -> np.ndarray:
        """Penultimate features [N, 128] float32 of images [N, S, S, 1] (used as given, no clip)."""
        return self._features_and_logits(images)[0]

    def logits(self, images) -> np.ndarray:
        """Class logits [N, 10] float32 of images [N, S, S, 1] (used as given, no clip)."""
        return self._features_and_logits(images)[1]

    def evaluate(self, images, labels) -> dict[str, float]:
        """Metrics of generated images [N, S, S, 1] (N >= 2) drawn for the requested labels [N].

        Keys: accuracy (argmax == label), fd (Fréchet distance of the features to the held-out
        digits'), precision and recall (k = 3 against the training digits' features; NaN for N <= 3), mean_abs and
        frac_saturated (of the clipped images), mean_abs_unclipped and frac_out_of_range (|x| > 1)
        of the finite pixels as given, nonfinite_rate (images with a NaN/inf pixel), num_images,
        and the held-out references real_accuracy, real_mean_abs, real_frac_saturated,
        real_fd_train (FD of the 1497 training digits to the held-out ones), real_precision and
        real_recall (of the 300 held-out digits against the training digits).
        """
        raw = self._check_images(images)
        n = raw.shape[0]
        if n < 2:
            raise ValueError(f"images must hold N >= 2 images for a covariance, got N = {n}")
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be integers of shape [{n}], got {labels.dtype}{labels.shape}"
            )
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(
                f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}"
            )

        finite = np.isfinite(raw)
        clipped = np.clip(np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        features, logits = self._features_and_logits(clipped)
        mu, sigma = feature_statistics(features)
        finite_abs = np.abs(raw[finite].astype(np.float64))
        clipped_stats = saturation_statistics(clipped)
        precision, recall = (  # the k-NN radii of the fake set need more than k images
            precision_recall(self.train_features, features)
            if n > PR_NEIGHBOURHOOD
            else (float("nan"), float("nan"))
        )
        return {
            "accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "fd": frechet_distance(mu, sigma, self.real_mu, self.real_sigma),
            "precision": precision,
            "recall": recall,
            "mean_abs": clipped_stats["mean_abs"],
            "frac_saturated": clipped_stats["frac_saturated"],
            "mean_abs_unclipped": float(finite_abs.mean()) if finite_abs.size else float("nan"),
            "frac_out_of_range": float(np.mean(finite_abs > 1.0)) if finite_abs.size else 0.0,
            "nonfinite_rate": float(np.mean(~finite.reshape(n, -1).all(axis=1))),
            "num_images": float(n),
            "real_accuracy": self.real_accuracy,
            "real_mean_abs": self.real_saturation["mean_abs"],
            "real_frac_saturated": self.real_saturation["frac_saturated"],
            "real_fd_train": self.real_fd_train,
            "real_precision": self.real_precision,
            "real_recall": self.real_recall,
        }

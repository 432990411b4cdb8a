"""Encode ImageNet to SD-VAE latents (`docs/math.md` §4.8) as ArrayRecord shards for `gmflow_jax.data.latents`.

Sources (`--source`):

* `folder`: an ImageFolder tree `--input_dir/<class>/<image>`; classes sorted by name get labels
  0..K-1, images are ordered by (class, file name), and example id i is the i-th image of that order;
* `tfds`: tensorflow-datasets `imagenet2012` (`--tfds_name`, `--split`) under `--tfds_data_dir`, read by
  random access (`as_data_source`, ArrayRecord format). When it is not prepared yet it is built once from
  the manually downloaded tar files in `--manual_dir`, which needs TensorFlow (`pip install .[prepare]`);
  reading a prepared copy does not. Example id i is the i-th record of the split.

Per image (`docs/math.md` §4.8, the ADM centre crop): box-downsample by 2 while the short side is >= 2 x
`--image_size`, bicubic-resize so that the short side is `--image_size`, centre crop; then one
horizontal flip with probability 1/2, drawn once per image from `numpy.random.default_rng((--seed,
FLIP_STREAM, id))`; pixels to [-1, 1]; the VAE posterior **sample** (noise from
`fold_in(PRNGKey(--seed), id)`) times the scaling factor. So every latent depends only on (image, id,
seed, VAE), not on the shard plan or the number of workers.

Output (`--output_dir`): `--num_shards` ArrayRecord files `latents-XXXXX-of-YYYYY.array_record` (shard j
holds ids [j N / S, (j + 1) N / S)) and `index.json` (format of `gmflow_jax.data.latents`). Resumable: a
shard is written under a temporary name and renamed when complete, and shards that already exist are
skipped, so rerunning the same command after an interruption finishes the job. `--npy` also writes
`latents.npy` / `labels.npy` (the memory-mapped layout of `gmflow_jax.data.imagenet_latents`).

Shards are encoded by `--workers` processes (spawned; each loads the VAE once). On a GPU host run one
worker per accelerator, or set `XLA_PYTHON_CLIENT_MEM_FRACTION` so that workers share it.

Usage:
  python tools/convert_vae.py --vae_dir /path/to/sd-vae-ft-ema --out_dir /ckpt/vae
  python tools/prepare_imagenet_latents.py --source=folder --input_dir=/data/imagenet/train \\
      --vae_dir=/ckpt/vae --output_dir=/data/in256_latents --num_shards=1024 --workers=8
  python tools/prepare_imagenet_latents.py --source=tfds --tfds_data_dir=/data/tfds \\
      --manual_dir=/data/imagenet_tars --vae_dir=/ckpt/vae --output_dir=/data/in256_latents
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
"""File name endings (case-insensitive) treated as images in an ImageFolder tree."""

FLIP_STREAM = 0xF11B
"""Constant mixed into the per-image flip seed (independent of the VAE noise stream)."""

SHARD_PATTERN = "latents-{index:05d}-of-{count:05d}.array_record"
"""File name of shard `index` of `count`."""


# ------------------------------------------------------------------------------------------------
# Pre-processing (§4.8)


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop: box-halve while short side >= 2 S, bicubic short side -> S, centre S x S.

    Returns uint8 `[S, S, 3]`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(
        tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


def flip_decision(seed: int, example_id: int) -> bool:
    """Whether image `example_id` is flipped horizontally: one draw, fixed by (seed, id)."""
    return bool(np.random.default_rng((int(seed), FLIP_STREAM, int(example_id))).random() < 0.5)


def preprocess(image: Image.Image, image_size: int, seed: int, example_id: int) -> np.ndarray:
    """Centre crop and the once-drawn flip of one image: uint8 `[S, S, 3]`."""
    arr = center_crop_arr(image, image_size)
    return np.ascontiguousarray(arr[:, ::-1]) if flip_decision(seed, example_id) else arr


# ------------------------------------------------------------------------------------------------
# Sources


class BadImageError(ValueError):
    """An image that cannot be decoded (truncated, not an image) or encodes to a non-finite latent;
    the message names its file (or tfds record) and example id."""


def _decoded(open_image, where: str, example_id: int) -> Image.Image:
    """`open_image()` fully decoded (PIL decodes lazily, so a truncated file fails only at `load`);
    `BadImageError` naming `where` on any decoding error."""
    try:
        with open_image() as image:
            image.load()  # the pixels stay in memory after the `with` closes the file
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports a truncated or corrupt file as OSError (UnidentifiedImageError is one) and
        # some plugin errors as SyntaxError / ValueError.
        raise BadImageError(
            f"image {where} (example id {example_id}) cannot be decoded: "
            f"{type(err).__name__}: {err}; delete or replace it and rerun (finished shards are kept)"
        ) from err


def list_image_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths in id order, labels [N] int64, class names) of an ImageFolder tree."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input_dir {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"input_dir {root!r} has no class sub-directories")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        paths += [os.path.join(root, name, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"input_dir {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(labels, np.int64), classes


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where the images come from (picklable, so that workers can open the source themselves)."""

    kind: str  # "folder" or "tfds"
    input_dir: str = ""
    tfds_name: str = "imagenet2012"
    split: str = "train"
    tfds_data_dir: str = ""
    manual_dir: str = ""


class FolderSource:
    """Random access to an ImageFolder tree: example i -> (PIL image, label)."""

    def __init__(self, spec: SourceSpec):
        """List the tree (sorted classes and files)."""
        self.paths, self.labels, self.classes = list_image_folder(spec.input_dir)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of class directories."""
        return len(self.classes)

    def describe(self, index: int) -> str:
        """Where image `index` comes from, for error messages (its path)."""
        return self.paths[index]

    def get(self, index: int) -> tuple[Image.Image, int]:
        """Image `index` and its label; `BadImageError` naming the file if it cannot be decoded."""
        image = _decoded(lambda: Image.open(self.paths[index]), self.describe(index), index)
        return image, int(self.labels[index])


class TfdsSource:
    """Random access to a prepared tensorflow-datasets split (ArrayRecord), numpy out."""

    def __init__(self, spec: SourceSpec):
        """Open (building it once from `manual_dir` with TensorFlow if needed) the split."""
        import tensorflow_datasets as tfds

        builder = tfds.builder(
            spec.tfds_name, data_dir=spec.tfds_data_dir or None, file_format="array_record"
        )
        try:
            self.source = builder.as_data_source(split=spec.split)
        except Exception as err:  # noqa: BLE001 - not prepared yet (tfds raises several types)
            if builder.is_prepared():
                raise
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                raise RuntimeError(
                    f"tfds dataset {spec.tfds_name!r} is not prepared under "
                    f"{spec.tfds_data_dir!r}; building it from --manual_dir needs TensorFlow: "
                    "pip install .[prepare]"
                ) from err
            if not spec.manual_dir:
                raise ValueError(
                    "--manual_dir (the downloaded ImageNet tar files) is required"
                ) from err
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=spec.manual_dir)
            )
            self.source = builder.as_data_source(split=spec.split)
        self.num_classes = int(builder.info.features["label"].num_classes)
        self.name, self.split = spec.tfds_name, spec.split

    def __len__(self) -> int:
        """Number of records in the split."""
        return len(self.source)

    def describe(self, index: int) -> str:
        """Where image `index` comes from, for error messages (dataset, split, record)."""
        return f"tfds {self.name}/{self.split} record {index}"

    def get(self, index: int) -> tuple[Image.Image, int]:
        """Image `index` (decoded by tfds, or JPEG bytes decoded here) and its label."""
        example = self.source[index]
        image = example["image"]
        if isinstance(image, (bytes, np.bytes_)):
            opened = _decoded(lambda: Image.open(io.BytesIO(image)), self.describe(index), index)
            return opened, int(example["label"])
        return Image.fromarray(np.asarray(image, np.uint8)), int(example["label"])


def open_source(spec: SourceSpec) -> FolderSource | TfdsSource:
    """The source of `spec.kind`."""
    if spec.kind == "folder":
        return FolderSource(spec)
    if spec.kind == "tfds":
        return TfdsSource(spec)
    raise ValueError(f"source must be 'folder' or 'tfds', got {spec.kind!r}")


# ------------------------------------------------------------------------------------------------
# Encoding


def shard_ranges(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """Example-id ranges [start, stop) of the shards: shard j = [j N / S, (j + 1) N / S)."""
    if num_shards < 1 or num_shards > num_examples:
        raise ValueError(f"num_shards must be in [1, {num_examples}], got {num_shards}")
    return [(j * num_examples // num_shards, (j + 1) * num_examples // num_shards)
            for j in range(num_shards)]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker needs to write one shard (picklable)."""

    source: SourceSpec
    vae_dir: str
    output_dir: str
    shard_index: int
    num_shards: int
    start: int
    stop: int
    image_size: int
    seed: int
    batch_size: int
    dtype: str
    vae_dtype: str

    @property
    def path(self) -> str:
        """Final path of this shard."""
        return os.path.join(
            self.output_dir, SHARD_PATTERN.format(index=self.shard_index, count=self.num_shards)
        )


_SOURCES: dict[SourceSpec, Any] = {}
"""Per-process cache of opened sources."""

_ENCODERS: dict[tuple[str, str], Any] = {}
"""Per-process cache of jitted VAE encoders, by (vae_dir, vae_dtype)."""


def make_encoder(vae_dir: str, vae_dtype: str = "float32"):
    """Jitted `(uint8 images [B, S, S, 3], ids [B]) , seed -> latents [B, S/f, S/f, C]` float32.

    The posterior sample of image i uses the key fold_in(PRNGKey(seed), id_i).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gmflow_jax.models.vae import load_vae, pixels_from_uint8

    vae = load_vae(os.path.join(vae_dir, "vae_params.npz"), dtype=vae_dtype)
    graphdef, params = nnx.split(vae)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    @jax.jit
    def encode(params, images, ids, seed):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(pixels_from_uint8(images))
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(ids)
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        return (mean + jnp.exp(0.5 * logvar) * noise - shift) * scale

    return lambda images, ids, seed: np.asarray(encode(params, images, ids, seed))


def _worker_state(job: Job):
    """(source, encoder) of this process, each opened once."""
    if job.source not in _SOURCES:
        _SOURCES.clear()
        _SOURCES[job.source] = open_source(job.source)
    key = (job.vae_dir, job.vae_dtype)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = make_encoder(job.vae_dir, job.vae_dtype)
    return _SOURCES[job.source], _ENCODERS[key]


def _batches(job: Job, source) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images [b, S, S, 3] uint8, labels [b], ids [b]) of the shard, in batches of batch_size."""
    ids = np.arange(job.start, job.stop)
    for first in range(0, len(ids), job.batch_size):
        chunk = ids[first : first + job.batch_size]
        images, labels = [], []
        for i in chunk:
            image, label = source.get(int(i))
            images.append(preprocess(image, job.image_size, job.seed, int(i)))
            labels.append(label)
        yield np.stack(images), np.asarray(labels, np.int64), chunk


def prepare_shard(job: Job) -> tuple[int, int, bool]:
    """Write one shard unless it exists; returns (shard index, records, written)."""
    from gmflow_jax.data.latents import DTYPES, encode_record, write_shard

    if os.path.exists(job.path):
        return job.shard_index, job.stop - job.start, False
    source, encode = _worker_state(job)
    records = []
    for images, labels, ids in _batches(job, source):
        n = len(ids)
        pad = job.batch_size - n  # fixed batch shape: one compilation
        padded_images = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
        padded_ids = np.concatenate([ids, np.repeat(ids[-1:], pad)]) if pad else ids
        latents = encode(padded_images, padded_ids.astype(np.uint32), job.seed)[:n]
        latents = latents.astype(DTYPES[job.dtype])
        finite = np.isfinite(latents.astype(np.float32).reshape(n, -1)).all(axis=1)
        if not finite.all():
            i = int(ids[np.flatnonzero(~finite)[0]])
            raise BadImageError(
                f"image {source.describe(i)} (example id {i}) encodes to a non-finite latent"
            )
        records += [encode_record(z, y, i) for z, y, i in zip(latents, labels, ids, strict=True)]
    write_shard(job.path, records)
    return job.shard_index, len(records), True


def export_npy(output_dir: str) -> tuple[str, str]:
    """Write `latents.npy` (float32 or float16 from bf16) and `labels.npy` from the shards."""
    from gmflow_jax.data.latents import decode_record, open_latent_shards

    shards = open_latent_shards(output_dir)
    out_dtype = np.float32 if shards.dtype == np.float32 else np.float16
    lat_path = os.path.join(output_dir, "latents.npy")
    lab_path = os.path.join(output_dir, "labels.npy")
    tmp_lat, tmp_lab = lat_path + ".tmp.npy", lab_path + ".tmp.npy"
    latents = np.lib.format.open_memmap(
        tmp_lat, mode="w+", dtype=out_dtype, shape=(shards.num_examples, *shards.latent_shape)
    )
    labels = np.empty(shards.num_examples, np.int32)
    from array_record.python.array_record_module import ArrayRecordReader

    for path in shards.paths:
        reader = ArrayRecordReader(path)
        try:
            for record in reader.read_all():
                z, y, i = decode_record(
                    record,
                    shards.latent_shape,
                    shards.dtype,
                    num_classes=shards.num_classes,
                    shard=path,
                )
                latents[i], labels[i] = z.astype(out_dtype), y
        finally:
            reader.close()
    latents.flush()
    del latents
    np.save(tmp_lab, labels)
    os.replace(tmp_lat, lat_path)
    os.replace(tmp_lab, lab_path)
    return lat_path, lab_path


# ------------------------------------------------------------------------------------------------
# Driver


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("folder", "tfds"), required=True)
    p.add_argument("--input_dir", default="", help="ImageFolder root (--source=folder)")
    p.add_argument("--tfds_name", default="imagenet2012")
    p.add_argument("--split", default="train")
    p.add_argument("--tfds_data_dir", default="", help="tfds data_dir (--source=tfds)")
    p.add_argument("--manual_dir", default="", help="ImageNet tar files for a first tfds build")
    p.add_argument("--vae_dir", required=True, help="vae_params.npz + vae_config.json")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--num_shards", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="0: encode in this process")
    p.add_argument("--batch_size", type=int, default=64, help="images per VAE call")
    p.add_argument("--seed", type=int, default=0, help="flip and posterior-noise seed")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--vae_dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples (smoke runs)")
    p.add_argument("--npy", action="store_true", help="also write latents.npy / labels.npy")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Plan the shards, encode the missing ones with a worker pool, write index.json."""
    args = _parse(argv)
    spec = SourceSpec(
        kind=args.source,
        input_dir=args.input_dir,
        tfds_name=args.tfds_name,
        split=args.split,
        tfds_data_dir=args.tfds_data_dir,
        manual_dir=args.manual_dir,
    )
    source = open_source(spec)
    num_examples = min(len(source), args.limit) if args.limit else len(source)
    num_classes = source.num_classes
    os.makedirs(args.output_dir, exist_ok=True)
    for name in os.listdir(args.output_dir):  # leftovers of interrupted writers
        if ".tmp-" in name:
            os.remove(os.path.join(args.output_dir, name))
    jobs = [
        Job(spec, args.vae_dir, args.output_dir, j, args.num_shards, start, stop,
            args.image_size, args.seed, args.batch_size, args.dtype, args.vae_dtype)
        for j, (start, stop) in enumerate(shard_ranges(num_examples, args.num_shards))
    ]  # fmt: skip
    pending = [job for job in jobs if not os.path.exists(job.path)]
    print(
        f"{num_examples} images, {len(jobs)} shards, {len(jobs) - len(pending)} already done",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.workers == 0 or len(pending) <= 1:
        results = map(prepare_shard, pending)
        _report(results, len(pending), t0)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(args.workers, len(pending))) as pool:
            _report(pool.imap_unordered(prepare_shard, pending), len(pending), t0)
    latent_shape = _latent_shape(args.vae_dir, args.image_size)
    extra = {
        "source": dataclasses.asdict(spec),
        "image_size": args.image_size,
        "seed": args.seed,
        "vae_dir": os.path.abspath(args.vae_dir),
        "preprocessing": "ADM centre crop (docs/math.md §4.8), one seeded horizontal flip, VAE sample",
    }
    shards = [
        {"file": os.path.basename(job.path), "num_records": job.stop - job.start,
         "first_id": job.start}
        for job in jobs
    ]  # fmt: skip
    from gmflow_jax.data.latents import open_latent_shards, write_index

    write_index(args.output_dir, shards, latent_shape, args.dtype, num_classes, extra)
    open_latent_shards(args.output_dir)  # check every shard against the index
    if args.npy:
        export_npy(args.output_dir)
    print(f"wrote {args.output_dir}/index.json", flush=True)
    return 0


def _latent_shape(vae_dir: str, image_size: int) -> tuple[int, int, int]:
    """Latent shape [S/f, S/f, C] of the VAE in `vae_dir` at `image_size`."""
    from gmflow_jax.models.vae import VAEConfig

    with open(os.path.join(vae_dir, "vae_config.json")) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    f = config.downsample_factor
    if image_size % f:
        raise ValueError(f"image_size {image_size} must be divisible by the VAE factor {f}")
    return image_size // f, image_size // f, config.latent_channels


def _report(results, total: int, t0: float) -> None:
    """Print progress as shards finish."""
    for done, (index, count, written) in enumerate(results, start=1):
        rate = done / max(time.perf_counter() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else math.inf
        state = "written" if written else "skipped"
        print(f"shard {index}: {count} records {state} ({done}/{total}, eta {eta:.0f} s)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BadImageError as err:  # one line naming the image, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

"""Image data for diffusion training: sources, grain batches, and grids.

Three sources, each a random-access sequence of ``{'image': uint8 (H, W, C), 'label': int}``:

* ``digits`` (the offline default, no network): scikit-learn's bundled 8×8 handwritten digits
  (1,797 real images, 16 grey levels mapped to 0..255), *upsampled* bilinearly (half-pixel
  centres, as ``jax.image.resize(..., 'linear')``) to ``resolution`` rather than zero-padded, so
  the digit fills the field the U-Net models (docs/diffusion.md, "Data");
* ``tfds_source``: a TFDS ``data_source`` (random access over ArrayRecord files), e.g.
  ``cifar10``, the paper's setting; needs ``tensorflow-datasets`` and a prepared ``data_dir``;
* ``ImageFolderSource``: PNG/JPEG files under a folder (FFHQ, AFHQ, ...), read lazily with PIL,
  centre-cropped and Lanczos-resized when not ``resolution`` already (as EDM's
  ``dataset_tool.py`` does offline). Unconditional: no labels.

``image_batches`` turns a source into a ``grain.MapDataset`` whose item ``step`` is this
process's share of the global batch of that step, scaled to [-1, 1] (EDM's ``x / 127.5 - 1``),
so a resumed run reads exactly the batches an uninterrupted one would. Horizontal flips (EDM's
``--xflip``) are drawn per global batch from ``(seed, step)``; leave them off for digits, where
a mirrored 2, 3, 4, 5, 7 or 9 is not a digit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "DIGITS_SPLITS",
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "ImageFolderSource",
    "digits",
    "image_batches",
    "image_grid",
    "linear_resize_matrix",
    "save_png",
    "tfds_source",
    "to_float",
    "to_uint8",
]

DIGITS_SPLITS = ("all", "train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """[-1, 1] -> uint8 [0, 255] as EDM's generate.py: ``(x * 127.5 + 128)`` clipped, truncated
    (i.e. rounded to the nearest level, the inverse of ``to_float``)."""
    return np.floor(np.clip(np.asarray(x, np.float32) * 127.5 + 128.0, 0, 255)).astype(np.uint8)


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with half-pixel centres, edges clamped.

    Output pixel i samples the input at u = (i + 0.5) n_in / n_out - 0.5 with the triangle kernel,
    which is what ``jax.image.resize(method='linear')`` does when upsampling.
    """
    u = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = u - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


def digits(
    resolution: int = 16, split: str = "all", *, seed: int = 0, test_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """scikit-learn's 8×8 digits upsampled to ``resolution``: ``{'image': uint8 (N, R, R, 1),
    'label': int32 (N,)}``.

    Args:
      resolution: R, a multiple of 8.
      split: ``'all'`` (1,797 images, in the file's order), or ``'train'`` / ``'test'``: a fixed
        permutation by ``seed`` with the last ``round(test_fraction * 1797)`` images held out
        (359 for the default 0.2), as used to train and check the digits feature classifier.
      seed: the permutation's seed.
      test_fraction: the held-out share.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split={split!r}; expected one of {DIGITS_SPLITS}")
    from sklearn.datasets import load_digits  # ships the data: no download

    raw = load_digits()
    x = raw.images.astype(np.float64) * (255.0 / 16.0)
    r = linear_resize_matrix(8, resolution)
    x = np.einsum("ij,njk,lk->nil", r, x, r)
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8)[..., None]
    labels = raw.target.astype(np.int32)
    if split != "all":
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        perm = np.random.default_rng(seed).permutation(len(labels))
        n_test = round(test_fraction * len(labels))
        idx = perm[-n_test:] if split == "test" else perm[:-n_test]
        images, labels = images[idx], labels[idx]
    return {"image": images, "label": labels}


class ArraySource(Sequence):
    """In-memory arrays as a source: item i is ``{key: array[i]}``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        if "image" not in arrays:
            raise ValueError(f"arrays need an 'image' entry, got keys {sorted(arrays)}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        n = len(self.arrays["image"])
        for k, v in self.arrays.items():
            if len(v) != n:
                raise ValueError(f"array {k!r} has {len(v)} rows, 'image' has {n}")

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


class ImageFolderSource(Sequence):
    """PNG/JPEG images found recursively under ``path`` (sorted by relative path), read lazily.

    Each item is ``{'image': uint8 (resolution, resolution, channels)}``. Every file's header is
    read at construction, so a file that is no image (or an unknown format) raises
    ``ValueError`` naming it before any training starts (one header read per file); a damaged
    image body raises the same when the item is read.
    """

    def __init__(self, path: str, resolution: int, channels: int = 3):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder {path!r} does not exist")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution!r}")
        self.files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {path!r}")
        for f in self.files:
            _open_image(f).close()  # the header only: PIL decodes on first use
        self.resolution, self.channels = int(resolution), channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path = self.files[i]
        with _open_image(path) as im:
            try:
                im = im.convert("RGB" if self.channels == 3 else "L")
            except (OSError, SyntaxError) as e:  # PIL's kinds for a damaged body
                raise ValueError(f"cannot read image {path!r}: {e}") from e
        w, h = im.size
        if (w, h) != (self.resolution, self.resolution):
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((self.resolution, self.resolution), Image.LANCZOS)
        x = np.asarray(im, np.uint8)
        return {"image": x[..., None] if x.ndim == 2 else x}


def _open_image(path: str):
    """``PIL.Image.open`` (reads the header), raising ``ValueError`` naming a file that is not
    an image PIL knows."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e


def tfds_source(name: str = "cifar10", split: str = "train", data_dir: str | None = None):
    """``tfds.data_source(name, split=split, data_dir=data_dir)``: items such as ``{'image',
    'label', 'id'}``.

    Never downloads: prepare the dataset once where there is network (``tfds build cifar10
    --file_format=array_record``) and pass its ``data_dir``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("the TFDS source needs `pip install tensorflow-datasets`") from e
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under {str(builder.data_dir)!r}; prepare it "
            f"where there is network: tfds build {name} --file_format=array_record "
            f"--data_dir=<dir>"
        )
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def image_batches(
    source: Sequence,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
):
    """Infinite ``grain.MapDataset``: item ``step`` = ``{'image': float32 (b, H, W, C) in
    [-1, 1], 'label': int32 (b,)}`` (label only if the source has one), ``b = batch_size //
    process_count``.

    ``batch_size`` is global. Every process draws the same permutation (a fresh one per epoch;
    batches never straddle epochs, the last ``len % batch_size`` examples of an epoch are
    skipped) and the same flips, and keeps rows ``[process_index * b, (process_index + 1) * b)``,
    so the processes' shares concatenate to the one-process batch.
    """
    import grain

    n = len(source)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} examples of the source")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size={batch_size} must be divisible by process_count={process_count}"
        )
    local = batch_size // process_count

    def load(global_idx, rng: np.random.Generator):
        flips = rng.random(len(global_idx)) < 0.5  # drawn for the global batch: same on all hosts
        rows = slice(process_index * local, (process_index + 1) * local)
        examples = [source[int(i)] for i in np.asarray(global_idx)[rows]]
        images = np.stack([np.asarray(e["image"]) for e in examples])
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"source images must be uint8 (H, W, C), got {images.dtype} {images.shape[1:]}"
            )
        images = to_float(images)
        if flip:
            images = np.where(flips[rows, None, None, None], images[:, :, ::-1], images)
        batch = {"image": images}
        if "label" in examples[0]:
            batch["label"] = np.asarray([e["label"] for e in examples], np.int32)
        return batch

    ds = grain.MapDataset.source(range(n))
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    return ds.batch(int(batch_size), drop_remainder=True).repeat().random_map(load, seed=int(seed))


def image_grid(x, cols: int | None = None, gap: int = 1) -> np.ndarray:
    """(N, H, W, C) images in [-1, 1] -> one float image in [0, 1]: ``cols`` per row (default
    ceil(sqrt(N))), separated by ``gap`` grey pixels, empty cells black."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    n, _, _, c = x.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    x = np.concatenate([x, np.full((rows * cols - n,) + x.shape[1:], -1.0, np.float32)])
    x = np.pad(x, ((0, 0), (0, gap), (0, gap), (0, 0)), constant_values=0.0)
    h, w = x.shape[1:3]
    grid = x.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    return np.clip((grid[: rows * h - gap, : cols * w - gap] + 1.0) / 2.0, 0.0, 1.0)


def save_png(path: str, image, scale: int = 1) -> None:
    """Writes an (H, W, C) image in [0, 1] as PNG, each pixel repeated ``scale`` times."""
    from PIL import Image

    x = np.clip(np.rint(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
    if scale > 1:
        x = x.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(path)

r"""Reference statistics for FID: Inception pool3 mean and covariance of a dataset, as ``.npz``.

    python -m launch.fid_stats --source=tfds:cifar10:train --data_dir=~/tensorflow_datasets \
        --out=cifar10_train.npz [--weights=fid_inception.safetensors] [--num=50000]
    python -m launch.fid_stats --source=folder:/data/ffhq64 --resolution=64 --out=ffhq64.npz
    python -m launch.fid_stats --source=digits --resolution=16 --out=digits16.npz

``--source``: ``tfds:<name>[:<split>]`` (a prepared TFDS ``data_source``, never downloaded),
``folder:<path>`` (PNG/JPEG files, centre-cropped and resized to ``--resolution``) or
``digits`` (the offline 8×8 digits upsampled to ``--resolution``). The weights come from
``--weights`` or ``$JAXSAFE_FID_INCEPTION`` (``launch/convert_fid_inception.py``). The file
holds ``mu``, ``sigma`` (pytorch-fid's keys), ``num`` and ``source``; ``launch/sample.py
--fid_ref`` scores samples against it. Errors are one line on stderr with exit status 2
(``--debug`` shows the traceback).
"""

import os

from absl import app, flags

from launch import user_errors


def _define_flags() -> None:
    global _SOURCE, _OUT, _WEIGHTS, _RESOLUTION, _DATA_DIR, _NUM, _BATCH
    _SOURCE = flags.DEFINE_string("source", None, "tfds:<name>[:<split>], folder:<path> or digits.")
    _OUT = flags.DEFINE_string("out", None, "Output .npz.")
    _WEIGHTS = flags.DEFINE_string(
        "weights", None, "FID Inception safetensors (default: $JAXSAFE_FID_INCEPTION)."
    )
    _RESOLUTION = flags.DEFINE_integer("resolution", 32, "Image size for folder: and digits.")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    _NUM = flags.DEFINE_integer("num", None, "Use the first NUM images (default: all).")
    _BATCH = flags.DEFINE_integer("batch", 64, "Inception batch size.")
    flags.mark_flags_as_required(["source", "out"])


def open_source(spec: str, resolution: int, data_dir: str | None = None):
    """The image source a ``--source`` string names."""
    from jaxsafe.data import images

    kind, _, rest = spec.partition(":")
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return images.tfds_source(name, split or "train", data_dir)
    if kind == "folder" and rest:
        return images.ImageFolderSource(os.path.expanduser(rest), resolution)
    if spec == "digits":
        return images.ArraySource(images.digits(resolution))
    raise ValueError(f"--source={spec!r}: expected tfds:<name>[:<split>], folder:<path> or digits")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxsafe import host_memory

    host_memory.retain()
    from jaxsafe.diffusion import fid
    from jaxsafe.nn import inception

    source = open_source(_SOURCE.value, _RESOLUTION.value, _DATA_DIR.value)
    fn = fid.feature_fn(inception.load(_WEIGHTS.value))
    num = _NUM.value or len(source)
    mu, sigma = fid.source_stats(fn, source, _BATCH.value, num)
    fid.save_stats(_OUT.value, mu, sigma, num=num, source=_SOURCE.value)
    print(f"wrote {_OUT.value}: {num} images of {_SOURCE.value}")


if __name__ == "__main__":
    _define_flags()
    user_errors.run(main)

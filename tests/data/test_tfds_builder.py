"""The TFDS path for real: a dataset built here from PNG files the test writes (no network, no
TensorFlow: ArrayRecord files), read back through ``tfds.data_source`` and grain batches."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

from jaxsafe.data import images  # noqa: E402

N, SIZE = 12, 8


class JaxsafeTinyPngs(tfds.core.GeneratorBasedBuilder):
    """PNG files of a folder (``builder_config`` free: the folder comes from ``png_dir``)."""

    VERSION = tfds.core.Version("1.0.0")
    png_dir = None

    def _info(self):
        # Tensor rather than tfds.features.Image: encoding an Image feature needs TensorFlow,
        # which this project does not install; data_source reads both the same way.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(SIZE, SIZE, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=3),
                    "id": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for path in sorted(self.png_dir.glob("*.png")):
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
            yield (
                path.stem,
                {"image": image, "label": int(path.stem.split("_")[1]) % 3, "id": path.stem},
            )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    pngs = root / "pngs"
    pngs.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for i in range(N):
        x = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(x).save(pngs / f"img_{i}.png")
        written[f"img_{i}"] = x
    JaxsafeTinyPngs.png_dir = pngs
    builder = JaxsafeTinyPngs(data_dir=str(root / "data"), file_format="array_record")
    builder.download_and_prepare()
    return str(root / "data"), written


def test_data_source_items_equal_the_files(prepared):
    data_dir, written = prepared
    src = images.tfds_source("jaxsafe_tiny_pngs", "train", data_dir)
    assert len(src) == N
    seen = set()
    for i in range(N):
        item = src[i]
        key = item["id"].decode() if isinstance(item["id"], bytes) else item["id"]
        np.testing.assert_array_equal(item["image"], written[key])
        assert item["label"] == int(key.split("_")[1]) % 3
        seen.add(key)
    assert seen == set(written)


def test_grain_batches_are_the_files_scaled(prepared):
    data_dir, written = prepared
    src = images.tfds_source("jaxsafe_tiny_pngs", "train", data_dir)
    ds = images.image_batches(src, 4, seed=3)
    by_image = {x.tobytes(): k for k, x in written.items()}
    keys = []
    for step in range(N // 4):  # one epoch: every file exactly once
        batch = ds[step]
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        for x, label in zip(batch["image"], batch["label"]):
            u8 = np.round((x + 1.0) * 127.5).astype(np.uint8)  # images.to_float inverted
            key = by_image[u8.tobytes()]
            assert label == int(key.split("_")[1]) % 3
            keys.append(key)
    assert sorted(keys) == sorted(written)


def test_an_unprepared_dataset_is_not_downloaded(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"TFDS dataset 'jaxsafe_tiny_pngs' is not "
        r"prepared under '.*'; prepare it where there is network: tfds build",
    ):
        images.tfds_source("jaxsafe_tiny_pngs", "train", str(tmp_path))


def test_fid_stats_reads_a_tfds_source(prepared):
    """`launch.fid_stats --source=tfds:<name>:<split>` reads the prepared dataset's images."""
    from launch.fid_stats import open_source

    data_dir, written = prepared
    src = open_source("tfds:jaxsafe_tiny_pngs:train", SIZE, data_dir)
    assert len(src) == N
    got = {}
    for i in range(N):
        item = src[i]
        key = item["id"].decode() if isinstance(item["id"], bytes) else item["id"]
        got[key] = item["image"]
    assert sorted(got) == sorted(written)
    for key, x in written.items():
        np.testing.assert_array_equal(got[key], x)

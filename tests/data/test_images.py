"""Image sources and grain batches: digits, image folders, TFDS (mocked), flips, processes."""

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from jaxsafe.data import images


@pytest.fixture(scope="module")
def digits16():
    return images.digits(16)


@pytest.mark.parametrize("n_out", [16, 32])
def test_linear_resize_matrix_matches_jax_image_resize(n_out):
    x = np.random.default_rng(0).random((8, 8))
    r = images.linear_resize_matrix(8, n_out)
    want = jax.image.resize(x, (n_out, n_out), "linear")
    np.testing.assert_allclose(r @ x @ r.T, want, atol=1e-6)
    # A partition of unity: constants stay constant.
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-12)


def test_digits_are_the_sklearn_images_upsampled(digits16):
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = digits16["image"], digits16["label"]
    assert x.shape == (1797, 16, 16, 1) and x.dtype == np.uint8
    assert y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
    np.testing.assert_array_equal(y, raw.target)
    want = jax.image.resize(raw.images[:50] * (255 / 16), (50, 16, 16), "linear")
    np.testing.assert_allclose(x[:50, ..., 0], np.clip(np.rint(want), 0, 255), atol=1)
    assert x.min() == 0 and x.max() == 255  # 16 grey levels span the full range


def test_digits_splits_are_disjoint_and_cover_all(digits16):
    train, test = images.digits(16, "train"), images.digits(16, "test")
    assert len(train["label"]) == 1438 and len(test["label"]) == 359
    rows = lambda d: {(im.tobytes(), int(lab)) for im, lab in zip(d["image"], d["label"])}
    assert rows(train) | rows(test) == rows(digits16)
    assert len(rows(train) & rows(test)) <= 1  # sklearn's digits hold a duplicate or two at most
    np.testing.assert_array_equal(images.digits(16, "test")["label"], test["label"])


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 8, got 12"):
        images.digits(12)
    with pytest.raises(
        ValueError, match=r"split='val'; expected one of \('all', 'train', 'test'\)"
    ):
        images.digits(16, "val")


def test_batches_are_deterministic_epoch_permutations():
    n, b = 12, 4
    src = images.ArraySource({"image": np.zeros((n, 2, 2, 1), np.uint8), "label": np.arange(n)})
    ds = images.image_batches(src, b, seed=3)
    again = images.image_batches(src, b, seed=3)
    epochs = [np.concatenate([ds[e * 3 + s]["label"] for s in range(3)]) for e in range(2)]
    for labels in epochs:
        np.testing.assert_array_equal(np.sort(labels), np.arange(n))  # every example once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    for step in (0, 5, 100):
        chex.assert_trees_all_equal(ds[step], again[step])
    assert not np.array_equal(images.image_batches(src, b, seed=4)[0]["label"], ds[0]["label"])


def test_batches_scale_to_minus_one_one(digits16):
    batch = images.image_batches(images.ArraySource(digits16), 64)[7]
    assert batch["image"].shape == (64, 16, 16, 1) and batch["image"].dtype == np.float32
    known = {(im.tobytes(), int(lab)) for im, lab in zip(digits16["image"], digits16["label"])}
    got = {
        (im.tobytes(), int(lab)) for im, lab in zip(images.to_uint8(batch["image"]), batch["label"])
    }
    assert got <= known and len(got) == 64  # 64 distinct real digits with their labels
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_allclose(images.to_float(u), u / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(images.to_uint8(images.to_float(u)), u)


def test_flips_mirror_some_images_and_processes_split_the_global_batch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 4, 5, 3), dtype=np.uint8)
    src = images.ArraySource({"image": x, "label": np.arange(32)})
    plain = images.image_batches(src, 16, seed=1)
    flipped = images.image_batches(src, 16, seed=1, flip=True)
    n_flipped = 0
    for step in range(4):
        a, f = plain[step], flipped[step]
        np.testing.assert_array_equal(a["label"], f["label"])  # flipping does not reorder
        same = np.all(a["image"] == f["image"], axis=(1, 2, 3))
        mirrored = np.all(a["image"][:, :, ::-1] == f["image"], axis=(1, 2, 3))
        assert np.all(same | mirrored)
        n_flipped += int(np.sum(mirrored))
    assert 16 < n_flipped < 48  # about half of 64
    shares = [
        images.image_batches(src, 16, seed=1, flip=True, process_index=i, process_count=2)
        for i in range(2)
    ]
    for step in (0, 3):
        joined = jax.tree.map(lambda *p: np.concatenate(p), shares[0][step], shares[1][step])
        chex.assert_trees_all_equal(joined, flipped[step])
        assert shares[0][step]["image"].shape == (8, 4, 5, 3)


def test_batch_argument_errors():
    src = images.ArraySource({"image": np.zeros((10, 2, 2, 1), np.uint8)})
    with pytest.raises(ValueError, match="batch_size=11 exceeds the 10 examples"):
        images.image_batches(src, 11)
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by process_count=4"):
        images.image_batches(src, 6, process_count=4)
    with pytest.raises(ValueError, match="array 'label' has 3 rows, 'image' has 10"):
        images.ArraySource({"image": np.zeros((10, 2, 2, 1)), "label": np.zeros(3)})
    bad = images.image_batches(images.ArraySource({"image": np.zeros((4, 2, 2, 1), np.float32)}), 2)
    with pytest.raises(ValueError, match="source images must be uint8"):
        bad[0]


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_reads_crops_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write(tmp_path / "b" / "a.png", a)
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = (200, 100, 50)  # only the central square is coloured
    write(tmp_path / "a.png", wide)
    write(tmp_path / "c.jpg", np.full((8, 8, 3), 90, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    src = images.ImageFolderSource(str(tmp_path), resolution=8)
    assert [p.split(str(tmp_path))[1] for p in src.files] == ["/a.png", "/b/a.png", "/c.jpg"]
    np.testing.assert_array_equal(src[1]["image"], a)  # PNG is lossless, no resize at 8×8
    np.testing.assert_array_equal(src[0]["image"], np.broadcast_to([200, 100, 50], (8, 8, 3)))
    assert np.abs(src[2]["image"].astype(int) - 90).max() <= 2  # JPEG of a flat image
    grey = images.ImageFolderSource(str(tmp_path), resolution=8, channels=1)[1]["image"]
    assert grey.shape == (8, 8, 1)
    batch = images.image_batches(src, 3, shuffle=False)[0]
    assert batch["image"].shape == (3, 8, 8, 3) and "label" not in batch


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder '.*missing' does not exist"):
        images.ImageFolderSource(str(tmp_path / "missing"), 8)
    with pytest.raises(FileNotFoundError, match=r"no .png/.jpg/.jpeg files under"):
        images.ImageFolderSource(str(tmp_path), 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.png'"):
        images.ImageFolderSource(str(tmp_path), 8)  # found at construction, before training
    # A valid header with a damaged body is found when the image is read.
    write(
        tmp_path / "broken.png",
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
    )
    (tmp_path / "broken.png").write_bytes((tmp_path / "broken.png").read_bytes()[:-500])
    src = images.ImageFolderSource(str(tmp_path), 8)
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.png'"):
        src[0]


def test_image_grid_places_images_row_major_with_gaps():
    x = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 1.0, 0.0)])
    grid = images.image_grid(x, cols=2, gap=1)
    assert grid.shape == (2 * 2 + 1, 2 * 3 + 1, 1)
    np.testing.assert_array_equal(grid[:2, :3], 0.0)  # image 0 (-1) top left
    np.testing.assert_array_equal(grid[:2, 4:], 1.0)  # image 1 (+1) top right
    np.testing.assert_array_equal(grid[3:, :3], 0.5)  # image 2 (0) bottom left
    np.testing.assert_array_equal(grid[3:, 4:], 0.0)  # empty cell
    np.testing.assert_array_equal(grid[2, :], 0.5)  # gap row
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\), got shape \(2, 3\)"):
        images.image_grid(np.zeros((2, 3)))

"""FID: the whole computation against NumPy/SciPy, statistics files, the launchers' FID path."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from jaxsafe.data import images
from jaxsafe.diffusion import fid, gaussian_stats
from jaxsafe.nn import inception

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scipy_fid(gen, ref):
    """pytorch-fid's calculate_frechet_distance on np.cov statistics."""
    mu1, mu2 = gen.mean(0), ref.mean(0)
    s1, s2 = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_against_statistics_file_equals_scipy_on_random_features(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) + 0.5
    gen = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))
    path = str(tmp_path / "ref.npz")
    fid.save_stats(path, *gaussian_stats(ref), num=400, source="random")
    expected = scipy_fid(gen, ref)
    assert expected > 1.0
    np.testing.assert_allclose(fid.fid(gen, path), expected, rtol=1e-7, atol=1e-7 * expected)
    with np.load(path) as f:
        assert int(f["num"]) == 400 and str(f["source"]) == "random"
    # A pytorch-fid --save-stats file holds only mu and sigma: it loads the same.
    np.savez(tmp_path / "pytorch_fid.npz", mu=ref.mean(0), sigma=np.cov(ref, rowvar=False))
    np.testing.assert_allclose(
        fid.fid(gen, str(tmp_path / "pytorch_fid.npz")), expected, rtol=1e-7, atol=1e-7 * expected
    )


def test_bad_statistics_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="FID reference statistics '.*nope.npz' not found"):
        fid.load_stats(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
    with pytest.raises(
        ValueError,
        match=r"keys.npz: FID statistics need 'mu' and 'sigma', "
        r"found \['mean'\]",
    ):
        fid.load_stats(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"'mu' \(3,\) and 'sigma' \(4, 4\) are not"):
        fid.load_stats(str(tmp_path / "shape.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.npz: cannot read as .npz \(not a zip archive"):
        fid.load_stats(str(tmp_path / "junk.npz"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"one.npy: cannot read as .npz \(it is a single .npy"):
        fid.load_stats(str(tmp_path / "one.npy"))
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(ValueError, match="nan.npz: 'mu' holds non-finite values"):
        fid.load_stats(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "ok.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="features have 2 dimensions, .*ok.npz has 3"):
        fid.fid(np.zeros((4, 2)), str(tmp_path / "ok.npz"))


class _PixelMean(nnx.Module):
    """A stand-in feature network: per-channel means and the first pixel."""

    def __call__(self, x):
        return jnp.concatenate([x.mean((1, 2)), x[:, 0, 0]], -1)


def test_features_batch_pad_and_quantise_like_saved_images():
    fn = fid.feature_fn(_PixelMean())
    x = np.random.default_rng(0).uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
    u8 = images.to_uint8(x)
    direct = np.asarray(fn(u8))
    # Five images in batches of two (the last padded) give the unbatched features.
    np.testing.assert_allclose(fid.features(fn, u8, batch_size=2), direct, rtol=0, atol=1e-6)
    # Float images are scored as the 8-bit images they would be saved as.
    np.testing.assert_allclose(np.asarray(fn(x)), direct, rtol=0, atol=1e-6)
    assert np.abs(np.asarray(fn(x)) - np.concatenate([x.mean((1, 2)), x[:, 0, 0]], -1)).max() > 1e-4
    source = images.ArraySource({"image": u8})
    np.testing.assert_allclose(fid.features(fn, source, 3), direct, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="num=6 but the source has only 5 images"):
        fid.source_stats(fn, source, num=6)


def _launch(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"launch.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_fid_stats_launcher_and_the_real_images_score_zero(random_fid_inception, tmp_path):
    out = tmp_path / "digits16.npz"
    r = _launch(
        "fid_stats",
        "--source=digits",
        "--resolution=16",
        "--num=24",
        "--batch=8",
        f"--weights={random_fid_inception}",
        f"--out={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    fn = fid.feature_fn(inception.load(random_fid_inception))
    feats = fid.features(fn, images.digits(16)["image"][:24], 8)
    scale = float(np.trace(np.cov(feats.T)))
    assert scale > 1e-2  # features that vary, not a collapsed network
    # The statistics file's own images are at FID 0 from it; 24 other digits are not.
    assert abs(fid.fid(feats, str(out))) < 1e-4 * scale  # round-off of a rank-23 sqrt
    assert fid.fid(fid.features(fn, images.digits(16)["image"][24:48], 8), str(out)) > 1e-2 * scale


@pytest.mark.slow
def test_launchers_name_missing_fid_files_in_one_line(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != inception.WEIGHTS_ENV}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.fid_stats",
            "--source=digits",
            f"--out={tmp_path / 'x.npz'}",
        ],
        cwd=ROOT,
        env=env_free,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("fid_stats: error: no FID Inception weights given")
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "x.npz").exists()
    r = _launch(
        "fid_stats", "--source=nope:x", f"--out={tmp_path / 'x.npz'}", f"--weights={tmp_path}"
    )
    assert r.returncode == 2 and "--source='nope:x': expected tfds:" in r.stderr
    r = _launch("sample", f"--workdir={tmp_path}", f"--fid_ref={tmp_path / 'missing.npz'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sample: error: FID reference statistics" in r.stderr and "missing.npz" in r.stderr


def test_fid_stats_sources(tmp_path):
    from PIL import Image

    from launch.fid_stats import open_source

    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    folder = open_source(f"folder:{tmp_path}", 8)
    assert len(folder) == 3 and folder[2]["image"].shape == (8, 8, 3)
    assert folder[2]["image"].min() == folder[2]["image"].max() == 80
    assert len(open_source("digits", 16)) == 1797
    for bad in ("tfds:", "folder:", "cifar10"):
        with pytest.raises(ValueError, match=f"--source='{bad}': expected tfds:<name>"):
            open_source(bad, 8)

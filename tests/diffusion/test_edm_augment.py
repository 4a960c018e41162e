"""EDM's non-leaky augmentation (jaxsafe.diffusion.augment): identity at p = 0, whole-pixel
transforms reproduced exactly, labels that encode the transform applied, the gating
probabilities, and the paper configs' network with EDM's augment_dim."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.diffusion import augment
from jaxsafe.diffusion import image_model as im
from jaxsafe.nn import songunet


def _image(h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (h, w, c)).astype(np.float32)


def _matrix(scale=0.0, rotate=0.0, aniso=0.0, aniso_r=0.0, translate=(0.0, 0.0), h=16, w=16):
    return augment.geometric_matrix(
        jnp.float32(scale),
        jnp.float32(rotate),
        jnp.float32(aniso),
        jnp.float32(aniso_r),
        jnp.asarray(translate, jnp.float32),
        h,
        w,
    )


def test_probability_zero_is_the_identity():
    x = _image()
    for seed in range(5):
        y, labels = augment.augment(jax.random.key(seed), x, p=0.0)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(labels, np.zeros(9))


def test_identity_warp_reconstructs_the_image():
    # The sym6 filter's up/down pair is a perfect-reconstruction pair: G = I returns the image.
    x = _image(h=12, w=20)
    np.testing.assert_allclose(augment.warp(x, jnp.eye(3)), x, rtol=0, atol=2e-5)


def test_whole_pixel_translation_moves_the_image():
    # translate_w = 0.5 on W = 16 is 0.5 * 16 * 0.125 = 1 pixel to the right (y = 0.5 on H = 16:
    # 1 pixel down); the column / row that enters is the reflection (index 1).
    x = _image()
    y = np.asarray(augment.warp(x, _matrix(translate=(0.5, 0.0))))
    np.testing.assert_allclose(y[:, 1:], x[:, :-1], rtol=0, atol=2e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 1], rtol=0, atol=2e-5)
    y = np.asarray(augment.warp(x, _matrix(translate=(0.0, -1.0))))  # 2 pixels up
    np.testing.assert_allclose(y[:-2], x[2:], rtol=0, atol=2e-5)


def _reference_warp(x, g_inv):
    """The "Execute geometric transformations" block of EDM's training/augment.py, step by step
    in PyTorch on one NCHW image, with the margin the reference derives from the transform's
    corners (jaxsafe pads by the cap instead)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    img = torch.tensor(np.transpose(x, (2, 0, 1))[None], dtype=torch.float64)
    _, c, h, w = img.shape
    g = torch.tensor(np.asarray(g_inv, np.float64))
    hz = torch.tensor(augment.SYM6, dtype=torch.float64)
    hz_pad = len(hz) // 4

    def t2(tx, ty):
        return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float64)

    def s2(sx, sy):
        return torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=torch.float64)

    cx, cy = (w - 1) / 2, (h - 1) / 2
    cp = (
        g
        @ torch.tensor(
            [[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=torch.float64
        ).t()
    )
    margin = torch.cat([-cp[:2], cp[:2]]).max(dim=1).values
    margin = margin + torch.tensor([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2, dtype=torch.float64)
    margin = margin.clamp(min=0).minimum(torch.tensor([w - 1, h - 1] * 2, dtype=torch.float64))
    mx0, my0, mx1, my1 = (int(v) for v in margin.ceil())
    img = F.pad(img, [mx0, mx1, my0, my1], mode="reflect")
    g = t2((mx0 - mx1) / 2, (my0 - my1) / 2) @ g
    k = hz.flip(0)[None, None].repeat(c, 1, 1)
    pad = (len(hz) + 1) // 2
    img = torch.stack([img, torch.zeros_like(img)], 4).reshape(1, c, img.shape[2], -1)[..., :-1]
    img = F.conv2d(img, k.unsqueeze(2), groups=c, padding=[0, pad])
    img = torch.stack([img, torch.zeros_like(img)], 3).reshape(1, c, -1, img.shape[3])[:, :, :-1]
    img = F.conv2d(img, k.unsqueeze(3), groups=c, padding=[pad, 0])
    g = s2(2, 2) @ g @ s2(0.5, 0.5)
    g = t2(-0.5, -0.5) @ g @ t2(0.5, 0.5)
    shape = [1, c, (h + hz_pad * 2) * 2, (w + hz_pad * 2) * 2]
    g = s2(2 / img.shape[3], 2 / img.shape[2]) @ g @ s2(shape[3] / 2, shape[2] / 2)
    grid = F.affine_grid(g[None, :2], shape, align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    k = hz[None, None].repeat(c, 1, 1)
    pad = (len(hz) - 1) // 2
    img = F.conv2d(img, k.unsqueeze(2), groups=c, stride=[1, 2], padding=[0, pad])
    img = img[:, :, :, hz_pad:-hz_pad]
    img = F.conv2d(img, k.unsqueeze(3), groups=c, stride=[2, 1], padding=[pad, 0])
    img = img[:, :, hz_pad:-hz_pad, :]
    return np.transpose(img[0].numpy(), (1, 2, 0))


@pytest.mark.parametrize(
    "params",
    [
        dict(rotate=math.pi / 2),
        dict(scale=-1.3, rotate=0.7, translate=(0.4, -0.9)),
        dict(scale=0.8, aniso=1.5, aniso_r=-2.0, translate=(-1.2, 0.3)),
        dict(aniso=-2.0),
    ],
)
def test_warp_matches_the_reference_pipeline(params):
    # Includes a quarter turn, which the pipeline does not reproduce as rot90: the sym6 filter
    # is not symmetric, so the upsampled grid does not commute with swapping the axes.
    x = _image(h=16, w=12, seed=3)
    g = _matrix(h=16, w=12, **params)
    np.testing.assert_allclose(augment.warp(x, g), _reference_warp(x, g), rtol=0, atol=2e-5)


def test_x_flip_is_exact():
    x = _image()
    seen = set()
    for seed in range(12):
        y, labels = augment.augment(
            jax.random.key(seed),
            x,
            p=0.12,
            yflip=0,
            scale=0,
            rotate_frac=0,
            aniso=0,
            translate_frac=0,
        )
        flipped = int(labels[0])
        seen.add(flipped)
        np.testing.assert_array_equal(y, x[:, ::-1] if flipped else x)
        np.testing.assert_array_equal(labels[1:], np.zeros(8))
    assert seen == {0, 1}


def test_labels_encode_the_transform_applied():
    # With every transform on (p = 1, no anisotropy, whose labels do not fix the sign of w), the
    # output equals the flips and the warp rebuilt from the labels alone:
    # [xflip, yflip, w_scale, cos w_rot - 1, sin w_rot, 0, 0, t_x, t_y].
    x = _image()
    for seed in range(4):
        y, lab = augment.augment(jax.random.key(seed), x, p=1.0, aniso=0)
        lab = np.asarray(lab, np.float64)
        assert abs((lab[3] + 1) ** 2 + lab[4] ** 2 - 1) < 1e-5
        rotate = math.atan2(lab[4], lab[3] + 1)
        flipped = x[:, ::-1] if lab[0] else x
        flipped = flipped[::-1] if lab[1] else flipped
        want = augment.warp(
            flipped, _matrix(scale=lab[2], rotate=rotate, translate=(lab[7], lab[8]))
        )
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(lab[5:7], [0, 0])


def test_gating_probabilities():
    # 4,000 draws at p = 0.12: x-flip 1/2 (xflip = 1e8 makes it certain to be drawn), y-flip
    # p/2, each geometric transform p (a N(0,1) or U(-pi, pi) draw is never exactly 0), the
    # anisotropy's axis rotated half the time. 3-sigma bands.
    n, p = 4000, 0.12
    keys = jax.random.split(jax.random.key(0), n)
    lab = np.asarray(jax.vmap(lambda k: augment.augment(k, jnp.zeros((8, 8, 1)), p)[1])(keys))

    def near(hits, want):
        return abs(np.mean(hits) - want) < 3 * math.sqrt(want * (1 - want) / len(hits))

    assert near(lab[:, 0] == 1, 0.5) and near(lab[:, 1] == 1, p / 2)
    for col in (2, 4, 7):  # scale, rotation (sin), translation
        assert near(lab[:, col] != 0, p), col
    on = lab[:, 5] != 0
    assert near(on, p)
    assert near(lab[on, 6] != 0, 0.5)
    assert abs(np.std(lab[lab[:, 2] != 0, 2]) - 1) < 0.15


@pytest.mark.parametrize(
    "setting,p,count",
    [
        ("cifar10_edm", 0.12, 55_733_891),
        ("cifar10_cond_edm", 0.12, 55_735_299),
        ("ffhq64_d128", 0.15, 61_805_571),
    ],
)
def test_paper_configs_train_with_edm_augmentation(setting, p, count):
    # EDM's parameter counts with augment_dim = 9 (tests/nn/test_songunet.py: EDM_COUNTS).
    c = importlib.import_module(f"configs.pfgmpp.{setting}").get_config()
    assert c.augment.p == p and im.songunet_kwargs(c)["augment_dim"] == 9
    model = nnx.eval_shape(lambda: songunet.SongUNet(**im.songunet_kwargs(c), rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == count
    cpu = importlib.import_module(f"configs.pfgmpp.{setting}").get_config("cpu")
    assert cpu.augment.p == 0 and im.songunet_kwargs(cpu)["augment_dim"] == 0

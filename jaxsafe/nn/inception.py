"""The FID Inception-v3 network in NNX: the 2048-d pool3 features behind every reported FID.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016, with the
weights of TensorFlow's 2015-12-05 Inception graph that the FID (Heusel et al., 2017) is defined
on. Structure and tensor names follow pytorch-fid's port (mseitzer/pytorch-fid,
``src/pytorch_fid/inception.py``: torchvision's Inception3 patched into FIDInceptionA/C/E_1/E_2),
so its ``pt_inception-2015-12-05-6726825d.pth`` loads after ``launch/convert_fid_inception.py``
rewrites it as safetensors. The FID patches of that file:

* every 3×3 average pool inside a block excludes the zero padding from its mean
  (``count_include_pad=False``, as TensorFlow's pool);
* the last block (Mixed_7c) pools its fourth branch with a 3×3 *max* pool.

Every convolution is bias-free, followed by batch normalisation with frozen statistics
(ε = 1e-3) and a ReLU. Input: (B, H, W, C) images in [-1, 1], C ∈ {1, 3} (grey images are
repeated over the channels); other sizes than 299×299 are resized bilinearly with half-pixel
centres and no antialiasing (``F.interpolate(..., 'bilinear', align_corners=False)``, what
pytorch-fid does); pytorch-fid's [0, 1] → [-1, 1] rescaling is the caller's [-1, 1] here.
Deviation: the classifier head (``fc``, 1,008 logits) is not built; FID needs pool3 only.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsafe.nn import conv3x3
from jaxsafe.weights import convert

SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
WEIGHTS_ENV = "JAXSAFE_FID_INCEPTION"
CONVERT_HINT = (
    "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
    "`python -m launch.convert_fid_inception --pth=<file> --out=<file.safetensors>` "
    "(needs the torch extra)"
)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nnx.Module):
    """Batch normalisation at inference: (x − mean) / √(var + ε) · scale + bias."""

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,)))
        self.bias = nnx.Param(jnp.zeros((features,)))
        self.mean = nnx.Param(jnp.zeros((features,)))
        self.var = nnx.Param(jnp.ones((features,)))

    def __call__(self, x):
        gain = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return x * gain + (self.bias[...] - self.mean[...] * gain)


class ConvBN(nnx.Module):
    """torchvision's BasicConv2d: bias-free convolution, frozen batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride=1, padding=0, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            cin,
            cout,
            _pair(kernel),
            strides=_pair(stride),
            padding=[(p, p) for p in _pair(padding)],
            use_bias=False,
            conv_general_dilated=conv3x3.conv_general_dilated,
            rngs=rngs,
        )
        self.bn = FrozenBatchNorm(cout)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


def _avg3(x):
    return nnx.avg_pool(
        x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
    )


def _max3(x, stride: int = 1):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs):
        self.branch1x1 = ConvBN(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = ConvBN(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = ConvBN(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], -1)


class InceptionB(nnx.Module):
    """Mixed_6a: the 35 → 17 reduction."""

    def __init__(self, cin: int, *, rngs):
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max3(x, 2)], -1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, *, rngs):
        row, col = dict(padding=(0, 3)), dict(padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = ConvBN(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), **row, rngs=rngs)
        self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], -1)


class InceptionD(nnx.Module):
    """Mixed_7a: the 17 → 8 reduction."""

    def __init__(self, cin: int, *, rngs):
        self.branch3x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max3(x, 2)], -1)


class InceptionE(nnx.Module):
    """Mixed_7b (``pool="avg"``) and Mixed_7c (``pool="max"``, the FID graph's max pool)."""

    def __init__(self, cin: int, pool: str, *, rngs):
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = ConvBN(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg3(x) if self.pool == "avg" else _max3(x)
        return jnp.concatenate(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            -1,
        )


class FIDInceptionV3(nnx.Module):
    """Inception-v3 up to pool3 with the FID graph's patches (module docstring)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, 1 or 3) images in [-1, 1] -> (B, 2048) pool3 features."""
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"x must be (B, H, W, 1 or 3) images, got shape {x.shape}")
        x = jnp.broadcast_to(x, x.shape[:3] + (3,)).astype(jnp.float32)
        if x.shape[1:3] != (SIZE, SIZE):
            x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), "linear", antialias=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max3(x, 2)))
        x = _max3(x, 2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(axis=(1, 2))


def weights_path(path: str | None = None) -> str:
    """``path``, else ``$JAXSAFE_FID_INCEPTION``; raises FileNotFoundError naming what is
    missing and how to make it."""
    path = path or os.environ.get(WEIGHTS_ENV, "")
    if not path:
        raise FileNotFoundError(
            f"no FID Inception weights given: pass a safetensors file or set "
            f"${WEIGHTS_ENV}; {CONVERT_HINT}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights {path!r} not found; {CONVERT_HINT}")
    return path


def abstract() -> FIDInceptionV3:
    return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))


def from_state_dict(state_dict, source: str = "state dict") -> FIDInceptionV3:
    """The network from pytorch-fid's tensors (torch names and layouts); the classifier
    head ``fc.*`` and ``*.num_batches_tracked`` are ignored."""
    model = abstract()
    expected = convert.model_params(model)
    params = convert.state_dict_to_params(
        state_dict, expected, source=source, ignore=(r"^fc\.", r"num_batches_tracked$")
    )
    return convert.load_params(model, params)


def load(path: str | None = None) -> FIDInceptionV3:
    """The FID Inception from the safetensors file of ``launch/convert_fid_inception.py``."""
    path = weights_path(path)
    return from_state_dict(convert.read_safetensors(path), source=path)

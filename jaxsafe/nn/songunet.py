"""EDM's SongUNet: the DDPM++ and NCSN++ networks in Flax NNX (NHWC).

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM, NeurIPS 2022), which re-implements the U-Nets of Song et al., "Score-Based
Generative Modeling through Stochastic Differential Equations" (ICLR 2021). Reference:
``NVlabs/edm`` ``training/networks.py::SongUNet`` (``UNetBlock``, ``Conv2d``, ``GroupNorm``,
``PositionalEmbedding``, ``FourierEmbedding``) and ``train.py``'s ``--arch`` presets. This is
EDM's raw F_θ; the preconditioning lives in :mod:`jaxsafe.diffusion.edm`. The noise embedding
φ = [sin(c_noise ω), cos(c_noise ω)] (positional ω for DDPM++; fixed ω = 2π f, f ~ N(0, 16²),
for NCSN++) feeds the mapping network e = silu(W_1 silu(W_0 (φ + W_y y √label_dim + b_y +
W_aug a) + b_0) + b_1). A residual block (``UNetBlock``: one attention head, GroupNorm with
min(32, C/4) groups, eps 1e-6) computes h = conv1(dropout(silu(GN_1(conv0(silu(GN_0(x))) +
A e)))) and x' = (h + skip(x)) √0.5, then, in attention blocks, (proj(attn(GN_2(x'))) + x') √0.5
with the softmax in float32. Resampling convolves each channel with the FIR f fᵀ/(Σf)², f = [1, 1]
(DDPM++) or [1, 3, 3, 1] (NCSN++). Deviations: none in the function computed (fused
*up*-resampling, which SongUNet never uses, is not implemented). Initialisation, parameter layout
and compute dtype: docs/models.md, "SongUNet". Parameter counts of EDM's networks as ``train.py``
builds them (``augment_dim=9``; ``augment_dim=0`` removes ``9 * N`` weights, 1,152 for DDPM++
and 2,304 for NCSN++; NCSN++'s Fourier buffer is not counted):

====================================  ===========  ==============
config                                uncond       cond (10 cls)
====================================  ===========  ==============
DDPM++ CIFAR-10 (``ddpmpp_cifar10``)  55,733,891   55,735,299
NCSN++ CIFAR-10 (``ncsnpp_cifar10``)  56,397,827   56,400,643
DDPM++ FFHQ-64 (``ddpmpp_ffhq64``)    61,805,571   -
NCSN++ FFHQ-64 (``ncsnpp_ffhq64``)    62,761,091   -
====================================  ===========  ==============
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.nn import conv3x3

__all__ = [
    "SONGUNET_SHARDING_RULES",
    "Buffer",
    "Conv2d",
    "GroupNorm",
    "SongUNet",
    "UNetBlock",
    "ddpmpp_cifar10",
    "ddpmpp_ffhq64",
    "fourier_embedding",
    "ncsnpp_cifar10",
    "ncsnpp_ffhq64",
    "positional_embedding",
    "resample_filter_2d",
    "xavier_uniform",
]

_DN = ("NHWC", "HWIO", "NHWC")

# Leaf names are jaxsafe.treepath.path_name strings ('enc/32x32_block0/conv0/kernel'). Conv and
# linear kernels hold 99.85% of the parameters, so only they are split over `fsdp`
# (largest divisible dimension, see jaxsafe.parallel.fsdp_spec); norms, biases and the Fourier
# frequencies are small and replicated.
SONGUNET_SHARDING_RULES: list[tuple[str, Any]] = [
    (r"(^|/)kernel$", "fsdp"),
    (r"(^|/)(bias|scale)$", "replicate"),
    (r"(^|/)map_noise/freqs$", "replicate"),
]


class Buffer(nnx.Variable):
    """A fixed, non-trainable array (PyTorch's ``register_buffer``), e.g. Fourier frequencies."""


def xavier_uniform(gain: float = 1.0):
    """EDM's ``xavier_uniform`` times ``init_weight``: ``U(+-gain sqrt(6 / (fan_in + fan_out)))``.

    For a kernel ``(..., in, out)`` JAX's fans are ``in * receptive`` and ``out * receptive``,
    the same as EDM's ``in_channels * k * k`` / ``out_channels * k * k``.
    """
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def resample_filter_2d(resample_filter: Sequence[float]) -> np.ndarray:
    """The separable FIR ``f f^T / (sum f)^2`` (sums to 1)."""
    f = np.asarray(resample_filter, np.float64)
    if f.ndim != 1 or f.size < 1 or f.sum() == 0:
        raise ValueError(
            f"resample_filter: expected a 1-D filter with non-zero sum, e.g. (1, 1) or "
            f"(1, 3, 3, 1), got {resample_filter!r}"
        )
    return np.outer(f, f) / f.sum() ** 2


# The FIR filter f f^T / (sum f)^2 is separable, g g^T with g = f / sum f, so both resamplings
# run as k shifted multiply-adds per axis, which XLA fuses into one elementwise pass; XLA:CPU
# runs the depthwise convolution (feature_group_count = C) far slower (docs/benchmarks.md,
# "The conv nets: DDPM++ (EDM / PFGM++) against the authors' step and sampler").
def _fir_axis_down(x, g, padding, axis):
    widths = [(padding, padding) if a == axis else (0, 0) for a in range(x.ndim)]
    x = jnp.pad(x, widths)
    n = (x.shape[axis] - len(g)) // 2 + 1
    return sum(
        float(g[a]) * jax.lax.slice_in_dim(x, a, a + 2 * n - 1, 2, axis) for a in range(len(g))
    )


def _fir_axis_up(x, g, padding, axis):
    # PyTorch's conv_transpose1d(stride=2, padding=p) with 2 g: zero-interleave, pad k - 1 - p,
    # correlate with the flipped filter (the gain 2 per axis keeps the mean).
    k, n = len(g), x.shape[axis]
    z = jnp.stack([x, jnp.zeros_like(x)], axis + 1)
    z = jax.lax.slice_in_dim(
        z.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1 :]), 0, 2 * n - 1, 1, axis
    )
    e = k - 1 - padding
    z = jnp.pad(z, [(e, e) if a == axis else (0, 0) for a in range(x.ndim)])
    m = z.shape[axis] - k + 1
    return sum(
        2.0 * float(g[k - 1 - a]) * jax.lax.slice_in_dim(z, a, a + m, 1, axis) for a in range(k)
    )


def _fir_down(x, g, padding):
    """``conv2d(x, g g^T per channel, stride=2, padding)`` on NHWC ``x``."""
    return _fir_axis_down(_fir_axis_down(x, g, padding, 1), g, padding, 2)


def _fir_up(x, g, padding):
    """``conv_transpose2d(x, 4 g g^T per channel, stride=2, padding)`` on NHWC ``x``."""
    return _fir_axis_up(_fir_axis_up(x, g, padding, 1), g, padding, 2)


def _conv(x, w, padding):
    return conv3x3.conv_general_dilated(
        x, w, (1, 1), [(padding, padding)] * 2, dimension_numbers=_DN
    )


class Conv2d(nnx.Module):
    """EDM's ``Conv2d``: a ``k x k`` convolution (``k = 0``: none) with optional FIR up/down.

    Unfused: ``down``: filter, then conv; ``up``: transposed filter, then conv.
    ``fused_resample`` with ``down``: conv (padding ``k//2 + (len(f) - 1)//2``), then the stride-2
    filter without padding (EDM's NCSN++ ``aux_residual``). Params ``kernel (k, k, in, out)``,
    ``bias (out,)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_weight: float = 1.0,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive, got up=True, down=True")
        if fused_resample and up:
            raise ValueError(
                "Conv2d: fused_resample is implemented for down only (as SongUNet uses it)"
            )
        if kernel and kernel % 2 == 0:
            raise ValueError(f"Conv2d: kernel must be odd or 0, got {kernel}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.resample_filter = tuple(float(v) for v in resample_filter)
        resample_filter_2d(self.resample_filter)  # validates
        self.kernel = (
            nnx.Param(
                xavier_uniform(init_weight)(
                    rngs.params(), (kernel, kernel, in_channels, out_channels), param_dtype
                )
            )
            if kernel
            else None
        )
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype)) if kernel and bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = None if self.kernel is None else self.kernel[...].astype(x.dtype)
        g = np.asarray(self.resample_filter) / sum(self.resample_filter)
        w_pad = 0 if w is None else w.shape[0] // 2
        f_pad = (len(g) - 1) // 2
        if self.fused_resample and self.down and w is not None:
            x = _fir_down(_conv(x, w, w_pad + f_pad), g, 0)
        else:
            if self.up:
                x = _fir_up(x, g, f_pad)
            if self.down:
                x = _fir_down(x, g, f_pad)
            if w is not None:
                x = _conv(x, w, w_pad)
        if self.bias is not None:
            x = x + self.bias[...].astype(x.dtype)
        return x


class GroupNorm(nnx.Module):
    """GroupNorm with EDM's group count ``min(num_groups, C // min_channels_per_group)``.

    Statistics in float32 (biased variance, as ``torch.nn.functional.group_norm``); groups are
    contiguous channel blocks. Params ``scale``, ``bias`` ``(C,)``.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
        param_dtype=jnp.float32,
    ):
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: num_channels={num_channels} must be >= {min_channels_per_group} and "
                f"divisible by min({num_groups}, num_channels // {min_channels_per_group})"
            )
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Two passes as above, each reduced per channel over the spatial axes first (C stays the
        # contiguous axis) and then over the group's channels; the normalisation and the affine
        # are then one multiply-add per element. XLA:CPU runs this faster than reductions over
        # a (..., G, C/G) view (docs/benchmarks.md, "The conv nets").
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        spatial = tuple(range(1, x.ndim - 1))
        n = math.prod(x.shape[1:-1]) * (c // g)
        per_channel = lambda t: jnp.repeat(t.reshape(b, g, c // g).sum(-1), c // g, axis=1)
        xf = x.astype(jnp.float32)
        mean = per_channel(xf.sum(spatial)) / n
        d = xf - mean.reshape(b, *(1,) * len(spatial), c)
        var = per_channel(jnp.square(d).sum(spatial)) / n
        a = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        return (d * a.reshape(b, *(1,) * len(spatial), c) + self.bias[...]).astype(x.dtype)


def _linear(in_features, out_features, *, use_bias=True, param_dtype, rngs):
    # The mapping network stays float32 (EDM feeds it float32 noise labels), hence no dtype.
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        param_dtype=param_dtype,
        kernel_init=xavier_uniform(),
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )


class UNetBlock(nnx.Module):
    """EDM's ``UNetBlock`` as SongUNet configures it (see the module docstring for the equation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[float] = (1, 1),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if attention and out_channels % num_heads:
            raise ValueError(
                f"UNetBlock: out_channels={out_channels} must divide by num_heads={num_heads}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.skip_scale = float(skip_scale)
        conv = {"resample_filter": resample_filter, "param_dtype": param_dtype, "rngs": rngs}
        self.norm0 = GroupNorm(in_channels, eps=eps, param_dtype=param_dtype)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, **conv)
        self.affine = _linear(emb_channels, out_channels, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(out_channels, eps=eps, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5, **conv)
        # resample_proj=True: whenever the shape changes, the skip is a 1x1 conv.
        self.skip = (
            Conv2d(in_channels, out_channels, 1, up=up, down=down, **conv)
            if out_channels != in_channels or up or down
            else None
        )
        if attention:
            self.norm2 = GroupNorm(out_channels, eps=eps, param_dtype=param_dtype)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, init_weight=math.sqrt(0.2), **conv)
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5, **conv)

    def _attention(self, x):
        b, h, w, c = x.shape
        n = self.num_heads
        qkv = self.qkv(self.norm2(x)).reshape(b, h * w, n, c // n, 3)
        q, k, v = (qkv[..., i] for i in range(3))
        logits = jnp.einsum(
            "bqnc,bknc->bnqk", q.astype(jnp.float32), k.astype(jnp.float32) / math.sqrt(c // n)
        )
        weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        a = jnp.einsum("bnqk,bknc->bqnc", weights, v).reshape(x.shape)
        return self.proj(a)

    def __call__(self, x: jax.Array, emb: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        orig = x
        x = self.conv0(jax.nn.silu(self.norm0(x)))
        params = self.affine(emb)[:, None, None, :].astype(x.dtype)
        x = jax.nn.silu(self.norm1(x + params))
        x = self.conv1(self.dropout(x, rngs=rngs))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale
        if self.num_heads:
            x = (self._attention(x) + x) * self.skip_scale
        return x


def positional_embedding(
    x: jax.Array, num_channels: int, *, max_positions: int = 10000, endpoint: bool = False
) -> jax.Array:
    """EDM's ``PositionalEmbedding``: ``[cos(x omega), sin(x omega)]``, ``(B,) -> (B, N)``.

    ``omega_j = (1 / max_positions)^(j / (N/2 - endpoint))``, ``j = 0 .. N/2 - 1``.
    """
    half = num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
    freqs = (1.0 / max_positions) ** freqs
    x = jnp.outer(x, freqs.astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def fourier_embedding(x: jax.Array, freqs: jax.Array) -> jax.Array:
    """EDM's ``FourierEmbedding``: ``[cos(2 pi x f), sin(2 pi x f)]``, ``(B,) -> (B, 2 len(f))``."""
    x = jnp.outer(x, (2 * np.pi * freqs).astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


_EMBEDDINGS = ("positional", "fourier")
_ENCODERS = ("standard", "skip", "residual")
_DECODERS = ("standard", "skip")


class SongUNet(nnx.Module):
    """EDM's ``SongUNet`` (DDPM++ / NCSN++), NHWC; see the module docstring.

    The arguments mirror EDM's and default to EDM's class defaults; the paper presets are
    :func:`ddpmpp_cifar10`, :func:`ncsnpp_cifar10`, :func:`ddpmpp_ffhq64`, :func:`ncsnpp_ffhq64`.

    Args:
      img_resolution: image size.
      in_channels: input channels.
      out_channels: output channels.
      label_dim: classes (0 = unconditional).
      augment_dim: augmentation-label size (0 = none).
      model_channels: the base width: level ``l``, at resolution ``img_resolution >> l``, has
        ``model_channels * channel_mult[l]`` channels.
      channel_mult: the per-level width multipliers.
      channel_mult_emb: embedding width ``model_channels * channel_mult_emb``.
      num_blocks: residual blocks per level.
      attn_resolutions: resolutions with attention blocks (every encoder block there, the last
        decoder block of each, and the first bottleneck block).
      dropout: dropout before every ``conv1``.
      label_dropout: probability of zeroing an example's class label in training (for
        classifier-free guidance).
      embedding_type: ``'positional'`` (DDPM++) or ``'fourier'`` (NCSN++).
      channel_mult_noise: noise-embedding width ``model_channels * channel_mult_noise``.
      encoder_type: ``'standard'``, ``'skip'`` or ``'residual'`` (NCSN++).
      decoder_type: ``'standard'`` or ``'skip'``.
      resample_filter: ``(1, 1)`` or ``(1, 3, 3, 1)``.
      dtype: trunk compute dtype (``None``: that of ``x``).
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` for initialisation only.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        *,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value, allowed in (
            ("embedding_type", embedding_type, _EMBEDDINGS),
            ("encoder_type", encoder_type, _ENCODERS),
            ("decoder_type", decoder_type, _DECODERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        resample_filter_2d(resample_filter)  # validates
        levels = len(channel_mult)
        if levels < 1 or img_resolution < 1 or img_resolution % (1 << (levels - 1)):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by "
                f"2**(len(channel_mult) - 1) = {1 << max(levels - 1, 0)}"
            )
        if not 0 <= dropout < 1 or not 0 <= label_dropout <= 1:
            raise ValueError(
                f"dropout must be in [0, 1) and label_dropout in [0, 1], got "
                f"{dropout}, {label_dropout}"
            )
        noise_channels = model_channels * channel_mult_noise
        if noise_channels % 2 or noise_channels < 4:
            raise ValueError(
                f"model_channels * channel_mult_noise = {noise_channels} must be even and >= 4"
            )
        emb_channels = model_channels * channel_mult_emb

        self.img_resolution, self.in_channels, self.out_channels = (
            img_resolution,
            in_channels,
            out_channels,
        )
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.label_dropout = float(label_dropout)
        self.embedding_type = embedding_type
        self.noise_channels = noise_channels
        self.dtype = dtype
        self.deterministic = False  # flipped by model.eval()/model.train(); gates label dropout

        lin = {"param_dtype": param_dtype, "rngs": rngs}
        conv = {"resample_filter": resample_filter, "param_dtype": param_dtype, "rngs": rngs}
        block = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            **conv,
        )

        # Mapping.
        if embedding_type == "fourier":
            self.map_noise = nnx.Dict(
                freqs=Buffer(
                    jax.random.normal(rngs.params(), (noise_channels // 2,), jnp.float32) * 16
                )
            )
        self.map_label = _linear(label_dim, noise_channels, **lin) if label_dim else None
        self.map_augment = (
            _linear(augment_dim, noise_channels, use_bias=False, **lin) if augment_dim else None
        )
        self.map_layer0 = _linear(noise_channels, emb_channels, **lin)
        self.map_layer1 = _linear(emb_channels, emb_channels, **lin)

        # Encoder.
        self.enc = nnx.Dict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **conv)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, **conv)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **conv)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, fused_resample=True, **conv
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block
                )
        # nnx.split/merge rebuild an nnx.Dict with sorted keys, so the forward order is kept apart.
        self.enc_order = tuple(self.enc.keys())
        skips = [self.enc[name].out_channels for name in self.enc_order if "aux" not in name]

        # Decoder.
        self.dec = nnx.Dict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, **block
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < levels - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, **conv
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(
                    cout, eps=1e-6, param_dtype=param_dtype
                )
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(
                    cout, out_channels, 3, init_weight=1e-5, **conv
                )
        self.dec_order = tuple(self.dec.keys())

    def embedding(
        self,
        noise_labels: jax.Array,
        class_labels: jax.Array | None = None,
        augment_labels: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The mapping network: ``(B,)`` noise labels -> ``(B, E)`` float32 embedding."""
        noise_labels = jnp.asarray(noise_labels, jnp.float32)
        if self.embedding_type == "positional":
            emb = positional_embedding(noise_labels, self.noise_channels, endpoint=True)
        else:
            emb = fourier_embedding(noise_labels, self.map_noise["freqs"][...])
        emb = jnp.concatenate(jnp.split(emb, 2, axis=1)[::-1], axis=1)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            y = jnp.asarray(class_labels, jnp.float32)
            if not self.deterministic and self.label_dropout:
                if rngs is None:
                    raise ValueError(
                        f"label_dropout={self.label_dropout} in training mode needs "
                        "rngs=nnx.Rngs(dropout=key) at call time (or model.eval())"
                    )
                keep = jax.random.uniform(rngs.dropout(), (y.shape[0], 1)) >= self.label_dropout
                y = y * keep.astype(y.dtype)
            emb = emb + self.map_label(y * np.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(jnp.asarray(augment_labels, jnp.float32))
        emb = jax.nn.silu(self.map_layer0(emb))
        return jax.nn.silu(self.map_layer1(emb))

    def _check_inputs(self, x, noise_labels, class_labels, augment_labels):
        r, c = self.img_resolution, self.in_channels
        if x.ndim != 4 or x.shape[1:] != (r, r, c):
            raise ValueError(f"x: expected NHWC shape (B, {r}, {r}, {c}), got {x.shape}")
        b = x.shape[0]
        if jnp.shape(noise_labels) != (b,):
            raise ValueError(f"noise_labels: expected shape ({b},), got {jnp.shape(noise_labels)}")
        labels = (
            ("class_labels", class_labels, "label_dim", self.label_dim),
            ("augment_labels", augment_labels, "augment_dim", self.augment_dim),
        )
        for name, value, dim_name, dim in labels:
            if value is None:
                if name == "class_labels" and dim:
                    raise ValueError(
                        f"class_labels: expected shape ({b}, {dim}) for label_dim={dim}, got None"
                    )
            elif not dim:
                raise ValueError(f"{name}: the model was built with {dim_name}=0; pass None")
            elif jnp.shape(value) != (b, dim):
                raise ValueError(f"{name}: expected shape ({b}, {dim}), got {jnp.shape(value)}")

    def __call__(
        self,
        x: jax.Array,
        noise_labels: jax.Array,
        class_labels: jax.Array | None = None,
        augment_labels: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """``F_theta(x; c_noise)``: NHWC ``(B, R, R, C_in)`` -> ``(B, R, R, C_out)``.

        ``class_labels`` ``(B, label_dim)`` (one-hot or soft), ``augment_labels``
        ``(B, augment_dim)`` (optional). In training mode with dropout, pass
        ``rngs=nnx.Rngs(dropout=key)``; after ``model.eval()`` no keys are needed.
        """
        x = jnp.asarray(x)
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        emb = self.embedding(noise_labels, class_labels, augment_labels, rngs=rngs)

        # Encoder: every non-aux output is a skip; aux branches feed the last skip.
        skips, aux = [], x
        for name in self.enc_order:
            module = self.enc[name]
            if "aux_down" in name:
                aux = module(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + module(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb, rngs=rngs) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)

        # Decoder: blocks whose input is wider than x take the next skip.
        aux = tmp = None
        for name in self.dec_order:
            module = self.dec[name]
            if "aux_up" in name:
                aux = module(aux)
            elif "aux_norm" in name:
                tmp = module(x)
            elif "aux_conv" in name:
                tmp = module(jax.nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[-1] != module.in_channels:
                    x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = module(x, emb, rngs=rngs)
        return aux


def _preset(defaults: dict, overrides: dict, rngs: nnx.Rngs) -> SongUNet:
    allowed = set(inspect.signature(SongUNet.__init__).parameters) - {"self", "rngs"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"unknown SongUNet argument(s) {unknown}; expected some of {sorted(allowed)}"
        )
    return SongUNet(**{**defaults, **overrides}, rngs=rngs)


_DDPMPP = {
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": (1, 1),
    "model_channels": 128,
}
_NCSNPP = {
    "embedding_type": "fourier",
    "encoder_type": "residual",
    "decoder_type": "standard",
    "channel_mult_noise": 2,
    "resample_filter": (1, 3, 3, 1),
    "model_channels": 128,
}
_CIFAR10 = {"img_resolution": 32, "in_channels": 3, "out_channels": 3, "channel_mult": (2, 2, 2)}
_FFHQ64 = {"img_resolution": 64, "in_channels": 3, "out_channels": 3, "channel_mult": (1, 2, 2, 2)}


def ddpmpp_cifar10(
    *, label_dim: int = 0, augment_dim: int = 9, dropout: float = 0.13, rngs: nnx.Rngs, **overrides
) -> SongUNet:
    """EDM ``train.py --arch=ddpmpp`` on CIFAR-10 (``--dropout=0.13 --augment=0.12`` defaults)."""
    return _preset(
        {
            **_DDPMPP,
            **_CIFAR10,
            "label_dim": label_dim,
            "augment_dim": augment_dim,
            "dropout": dropout,
        },
        overrides,
        rngs,
    )


def ncsnpp_cifar10(
    *, label_dim: int = 0, augment_dim: int = 9, dropout: float = 0.13, rngs: nnx.Rngs, **overrides
) -> SongUNet:
    """EDM ``train.py --arch=ncsnpp`` on CIFAR-10 (``--dropout=0.13 --augment=0.12`` defaults)."""
    return _preset(
        {
            **_NCSNPP,
            **_CIFAR10,
            "label_dim": label_dim,
            "augment_dim": augment_dim,
            "dropout": dropout,
        },
        overrides,
        rngs,
    )


def ddpmpp_ffhq64(
    *, label_dim: int = 0, augment_dim: int = 9, dropout: float = 0.05, rngs: nnx.Rngs, **overrides
) -> SongUNet:
    """EDM's FFHQ-64 run: ``--arch=ddpmpp --cres=1,2,2,2 --dropout=0.05 --augment=0.15``."""
    return _preset(
        {
            **_DDPMPP,
            **_FFHQ64,
            "label_dim": label_dim,
            "augment_dim": augment_dim,
            "dropout": dropout,
        },
        overrides,
        rngs,
    )


def ncsnpp_ffhq64(
    *, label_dim: int = 0, augment_dim: int = 9, dropout: float = 0.05, rngs: nnx.Rngs, **overrides
) -> SongUNet:
    """EDM's FFHQ-64 run: ``--arch=ncsnpp --cres=1,2,2,2 --dropout=0.05 --augment=0.15``."""
    return _preset(
        {
            **_NCSNPP,
            **_FFHQ64,
            "label_dim": label_dim,
            "augment_dim": augment_dim,
            "dropout": dropout,
        },
        overrides,
        rngs,
    )

"""The Stable Diffusion autoencoder: diffusers' ``AutoencoderKL`` in Flax NNX (NHWC).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022),
Sec. 3.1: an encoder ``E`` maps an image ``x in [-1, 1]^{H x W x 3}`` to a diagonal Gaussian
``q(z | x) = N(mu, diag(exp(logvar)))`` on ``z in R^{H/f x W/f x 4}`` (``f = 8`` for SD), a
decoder ``D`` maps ``z`` back, trained with a slight KL penalty ("KL-reg."). The diffusion model
works on ``scaling_factor * z`` (0.18215 for SD 1.x/2.x: the inverse standard deviation of the
training latents, so they have roughly unit variance); a sampler divides by it before decoding.

Layout (diffusers names): ``encoder`` (``conv_in``, ``down_blocks/i`` of resnets and a stride-2
``downsamplers/0`` except at the last level, ``mid_block`` resnet-attention-resnet with
single-head spatial self-attention, ``conv_norm_out``, ``conv_out`` to ``2 * latent_channels``),
``quant_conv`` (1x1), ``post_quant_conv`` (1x1), ``decoder`` (mirror with ``layers_per_block + 1``
resnets per level and nearest-x2 ``upsamplers/0``). GroupNorm eps 1e-6 everywhere; ``logvar`` is
clipped to ``[-30, 20]`` as in diffusers' ``DiagonalGaussianDistribution``. SD's VAE has
83,653,863 parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsafe.nn.sd_layers import (
    Attention,
    DownBlock2D,
    MidBlock2D,
    UpBlock2D,
    check_fixed_keys,
    conv2d,
    group_norm,
)

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "Decoder", "Encoder"]

_EPS = 1e-6
_FIXED_DIFFUSERS_KEYS = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture; defaults are SD 1.x/2.x's ``vae/config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = getattr(self, name)
            bad = [t for t in types if t != allowed]
            if bad:
                raise ValueError(
                    f"AutoencoderKLConfig.{name}: unsupported block type(s) {bad}; "
                    f"supported: ('{allowed}',)"
                )
            if len(types) != n:
                raise ValueError(
                    f"AutoencoderKLConfig.{name} has {len(types)} entries, "
                    f"block_out_channels has {n}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderKLConfig:
        """From a diffusers ``vae/config.json`` dict (unknown keys ignored)."""
        check_fixed_keys(d, _FIXED_DIFFUSERS_KEYS, "AutoencoderKL")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("sample_size"), tuple):
            kwargs["sample_size"] = kwargs["sample_size"][0]
        return cls(**kwargs)

    def to_diffusers_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "AutoencoderKL", **d}


def _vae_attention(groups, *, dtype, param_dtype, rngs):
    def make(channels):
        return Attention(
            channels,
            heads=1,
            dim_head=channels,
            bias=True,
            norm_groups=groups,
            norm_eps=_EPS,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    return make


class Encoder(nnx.Module):
    """``x`` ``(B, H, W, in)`` -> moments ``(B, H/f, W/f, 2 * latent_channels)``."""

    def __init__(
        self, cfg: AutoencoderKLConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        ch, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, ch[0], **kw)
        self.down_blocks = nnx.List(
            [
                DownBlock2D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=cfg.layers_per_block,
                    temb_channels=None,
                    groups=g,
                    eps=_EPS,
                    add_downsample=i < n - 1,
                    downsample_padding=0,
                    **kw,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock2D(
            ch[-1],
            temb_channels=None,
            groups=g,
            eps=_EPS,
            make_attention=_mid_attention(cfg, **kw),
            **kw,
        )
        self.conv_norm_out = group_norm(ch[-1], g, _EPS, **kw)
        self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """``z`` ``(B, h, w, latent_channels)`` -> image ``(B, h f, w f, out)``."""

    def __init__(
        self, cfg: AutoencoderKLConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        rev, n, g = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = conv2d(cfg.latent_channels, rev[0], **kw)
        self.mid_block = MidBlock2D(
            rev[0],
            temb_channels=None,
            groups=g,
            eps=_EPS,
            make_attention=_mid_attention(cfg, **kw),
            **kw,
        )
        self.up_blocks = nnx.List(
            [
                UpBlock2D(
                    rev[max(i - 1, 0)],
                    rev[i],
                    skip_channels=(0,) * (cfg.layers_per_block + 1),
                    temb_channels=None,
                    groups=g,
                    eps=_EPS,
                    add_upsample=i < n - 1,
                    **kw,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = group_norm(rev[-1], g, _EPS, **kw)
        self.conv_out = conv2d(rev[-1], cfg.out_channels, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


def _mid_attention(cfg, **kw):
    if cfg.mid_block_add_attention:
        return _vae_attention(cfg.norm_num_groups, **kw)
    return lambda channels: _Identity()


class _Identity(nnx.Module):
    def __call__(self, h, context=None):
        return h


class AutoencoderKL(nnx.Module):
    """KL autoencoder with ``encode(x) -> (mean, logvar)`` and ``decode(z) -> x``.

    Images are NHWC in ``[-1, 1]``; latents are the unscaled ``z`` (multiply by
    ``config.scaling_factor`` before diffusion, divide before decoding).
    """

    def __init__(
        self, config: AutoencoderKLConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        z2 = 2 * config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = conv2d(z2, z2, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = (
            conv2d(config.latent_channels, config.latent_channels, 1, **kw)
            if config.use_post_quant_conv
            else None
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)``, each ``(B, H/f, W/f, latent_channels)``."""
        cfg = self.config
        f = cfg.downsample_factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"x: expected (B, H, W, {cfg.in_channels}) NHWC with H, W "
                f"divisible by {f}, got {x.shape}"
            )
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Image ``(B, h f, w f, out_channels)`` from unscaled latents ``(B, h, w, latent)``."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"z: expected (B, h, w, {self.config.latent_channels}) NHWC, got {z.shape}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction ``decode(z)``: ``z ~ q(z|x)`` when ``rng`` is given, else the mode."""
        mean, logvar = self.encode(x)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decode(z)

"""Building blocks shared by the Stable Diffusion UNet, VAE and CLIP text encoder (Flax NNX, NHWC).

Stable Diffusion is the latent diffusion model of Rombach, Blattmann, Lorenz, Esser, Ommer,
"High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022). The blocks follow
the ``diffusers`` implementation (``models/resnet.py``, ``attention.py``,
``attention_processor.py``, ``embeddings.py``, ``transformers/transformer_2d.py``,
``unets/unet_2d_blocks.py``) so that its checkpoints load by renaming alone (paths such as
``transformer_blocks/0/attn2/to_k/kernel``). With x a feature map, c the text context, e the
time embedding:

* ResnetBlock2D: ``h = conv1(silu(GN1(x))) + W_t silu(e)``,
  ``y = shortcut(x) + conv2(silu(GN2(h)))`` (``shortcut`` a 1x1 conv when channels change);
* Attention (Vaswani et al. 2017): ``softmax(Q K^T / sqrt(d)) V`` per head with ``Q = x W_q``,
  ``K = c W_k``, ``V = c W_v`` (``c = x`` for self-attention); cross-attention (``attn2``) is
  where the text enters, its ``to_k``/``to_v`` what closed-form concept erasure edits;
* BasicTransformerBlock: ``x += attn1(LN1 x); x += attn2(LN2 x, c); x += FF(LN3 x)`` with the
  GEGLU feed-forward (Shazeer 2020) ``W_2 (a * gelu(g))``, ``[a, g] = W_1 x``, width ``4 d``;
* Transformer2DModel: ``y = x + proj_out(blocks(proj_in(GN(x))))``, 1x1-conv (SD 1.x) or linear
  (SD 2.x) projections;
* timestep embedding (DDPM): ``f_i = exp(-ln(10000) i / (D/2 - s))``, ``[sin(t f), cos(t f)]``
  (``[cos, sin]`` with ``flip_sin_to_cos``), then ``linear_2(silu(linear_1(emb)))``.

Attention is :func:`jaxsafe.nn.attention.dot_product_attention` (logits and softmax in float32,
what diffusers' ``upcast_attention``/``upcast_softmax`` ask for); norms use two-pass variance and
GroupNorm eps 1e-6 as PyTorch. Initialisation is Flax's default; checkpoints overwrite it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsafe.nn import attention, conv3x3

__all__ = [
    "GEGLU",
    "SD_SHARDING_RULES",
    "Attention",
    "BasicTransformerBlock",
    "DownBlock2D",
    "Downsample2D",
    "FeedForward",
    "MidBlock2D",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Transformer2DModel",
    "UpBlock2D",
    "Upsample2D",
    "check_fixed_keys",
    "conv2d",
    "get_timestep_embedding",
    "group_norm",
    "layer_norm",
]

# big_vision-style rules for `jaxsafe.parallel.shardings_for`: norms, biases and the small
# position table are replicated (splitting them only adds collectives); every kernel and the
# token table fall through to the default "fsdp" rule (largest dimension divisible by the axis).
SD_SHARDING_RULES: list[tuple[str, object]] = [
    (
        r"(^|/)(norm\w*|layer_norm\w*|group_norm|final_layer_norm|conv_norm_out)/(scale|bias)$",
        "replicate",
    ),
    (r"/bias$", "replicate"),
    (r"position_embedding/embedding$", P()),
]


def check_fixed_keys(d: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    """Raises ``ValueError`` for a reference config key set to a value these modules do not
    implement (``fixed`` maps key -> the one supported value; per-level lists are checked
    element-wise; ``False`` counts as an unset ``None`` flag)."""
    for key, supported in fixed.items():
        if key not in d:
            continue
        values = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
        if any(v != supported and not (supported is None and v is False) for v in values):
            raise ValueError(
                f"{what} config: unsupported {key}={d[key]!r} "
                f"(jaxsafe implements only {key}={supported!r})"
            )


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """``torch.nn.Conv2d`` in NHWC: kernel ``(k, k, in, out)``, padding ``(k - 1) // 2`` default."""
    p = (kernel_size - 1) // 2 if padding is None else padding
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((p, p), (p, p)),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv3x3.conv_general_dilated,
        rngs=rngs,
    )


def group_norm(
    channels: int, groups: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.GroupNorm:
    if channels % groups:
        raise ValueError(
            f"GroupNorm: channels={channels} is not divisible by norm_num_groups={groups}"
        )
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(
    dim: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def get_timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding ``(N, dim)`` of timesteps ``(N,)`` (diffusers' convention, above)."""
    t = jnp.asarray(timesteps, jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (N,), got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(
        -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    )
    arg = scale * t[:, None] * freqs[None]
    emb = jnp.concatenate(
        [jnp.cos(arg), jnp.sin(arg)] if flip_sin_to_cos else [jnp.sin(arg), jnp.cos(arg)], axis=-1
    )
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_2(silu(linear_1(emb)))``."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, emb: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(emb)))


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` (``time_embedding_norm='default'``, no dropout, scale 1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv2d(in_channels, out_channels, **kw)
        self.time_emb_proj = (
            nnx.Linear(temb_channels, out_channels, **kw) if temb_channels is not None else None
        )
        self.norm2 = group_norm(out_channels, groups, eps, **kw)
        self.conv2 = conv2d(out_channels, out_channels, **kw)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv. ``padding=1`` (UNet) or ``padding=0`` after padding one zero row/column
    at the bottom/right (VAE encoder, diffusers' asymmetric ``F.pad(x, (0, 1, 0, 1))``)."""

    def __init__(
        self,
        channels: int,
        *,
        padding: int = 1,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if padding not in (0, 1):
            raise ValueError(f"Downsample2D: padding must be 0 or 1, got {padding}")
        self.padding = padding
        self.conv = conv2d(
            channels,
            channels,
            3,
            stride=2,
            padding=padding,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """Multi-head attention with separate ``to_q``/``to_k``/``to_v`` and ``to_out/0`` projections.

    With ``norm_groups`` set it is the VAE's spatial self-attention: input ``(B, H, W, C)``,
    GroupNorm first, residual added (diffusers ``Attention(..., residual_connection=True)``).
    Otherwise the input is ``(B, N, query_dim)`` and ``context`` ``(B, M, cross_attention_dim)``
    (self-attention when ``context`` is None); no residual.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        norm_groups: int | None = None,
        norm_eps: float = 1e-6,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        inner = heads * dim_head
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.heads, self.dim_head = heads, dim_head
        self.group_norm = (
            group_norm(query_dim, norm_groups, norm_eps, **kw) if norm_groups is not None else None
        )
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, **kw)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, **kw)
        # A list so the path is `to_out/0/...` like diffusers' ModuleList([Linear, Dropout]).
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, **kw)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        spatial = x.ndim == 4
        if spatial:
            residual, (b, hh, ww, c) = x, x.shape
            if self.group_norm is not None:
                x = self.group_norm(x)
            x = x.reshape(b, hh * ww, c)
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        o = attention.dot_product_attention(q, k, v)
        out = self.to_out[0](o.reshape(*o.shape[:2], -1))
        if spatial:
            out = out.reshape(b, hh, ww, c) + residual
        return out


class GEGLU(nnx.Module):
    """``a * gelu(g)`` with ``[a, g] = proj(x)`` (exact gelu, as ``F.gelu``)."""

    def __init__(
        self, dim_in: int, dim_out: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, g = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(g, approximate=False)


class FeedForward(nnx.Module):
    """``net/0`` GEGLU(dim -> 4 dim), ``net/1`` dropout (rate 0), ``net/2`` Linear(4 dim -> dim)."""

    def __init__(
        self, dim: int, *, mult: int = 4, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        inner = dim * mult
        self.net = nnx.List(
            [
                GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                nnx.Dropout(0.0),  # keeps diffusers' indices: the output projection is net.2
                nnx.Linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention ``attn1``, cross-attention ``attn2``, GEGLU ``ff``; pre-LN, eps 1e-5."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        *,
        cross_attention_dim: int,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim, **kw
        )
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer on a ``(B, H, W, C)`` map with text context ``(B, L, D)``."""

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        *,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        inner = heads * dim_head
        self.use_linear_projection = bool(use_linear_projection)
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, **kw)
        # A 1x1 conv and a Linear are the same map on NHWC; only the checkpoint shape differs.
        proj = (
            (lambda i, o: nnx.Linear(i, o, **kw))
            if use_linear_projection
            else (lambda i, o: conv2d(i, o, 1, **kw))
        )
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner, heads, dim_head, cross_attention_dim=cross_attention_dim, **kw
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = proj(inner, in_channels)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, _ = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(b, hh * ww, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.reshape(b, hh, ww, h.shape[-1]))


MakeAttention = Callable[[int], nnx.Module]


class DownBlock2D(nnx.Module):
    """``num_layers`` resnets (each followed by an attention if ``make_attention``), then an
    optional downsampler. Returns the output and the per-layer outputs the UNet skips across."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        add_downsample: bool,
        downsample_padding: int = 1,
        make_attention: MakeAttention | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            nnx.List([make_attention(out_channels) for _ in range(num_layers)])
            if make_attention is not None
            else None
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, **kw)])
            if add_downsample
            else None
        )

    def __call__(self, h, temb=None, context=None):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            outputs.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            outputs.append(h)
        return h, tuple(outputs)


class UpBlock2D(nnx.Module):
    """Resnets (+ attentions) then an optional nearest-x2 upsampler.

    ``skip_channels[i]`` is the width of the skip tensor concatenated (channels last, after the
    current features, as ``torch.cat([h, skip], dim=1)``) before resnet ``i``; all zeros for the
    VAE decoder, which has no skips.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        skip_channels: Sequence[int],
        temb_channels: int | None,
        groups: int,
        eps: float,
        add_upsample: bool,
        make_attention: MakeAttention | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        n = len(skip_channels)
        self.uses_skips = any(skip_channels)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    (in_channels if i == 0 else out_channels) + skip_channels[i],
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    **kw,
                )
                for i in range(n)
            ]
        )
        self.attentions = (
            nnx.List([make_attention(out_channels) for _ in range(n)])
            if make_attention is not None
            else None
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, h, skips: Sequence[jax.Array] = (), temb=None, context=None):
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            if self.uses_skips:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class MidBlock2D(nnx.Module):
    """``resnets/0`` -> ``attentions/0`` -> ``resnets/1`` at constant width (UNet and VAE)."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        make_attention: MakeAttention,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    channels, channels, temb_channels=temb_channels, groups=groups, eps=eps, **kw
                )
                for _ in range(2)
            ]
        )
        self.attentions = nnx.List([make_attention(channels)])

    def __call__(self, h, temb=None, context=None):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)

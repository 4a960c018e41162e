"""The Stable Diffusion denoiser: diffusers' ``UNet2DConditionModel`` in Flax NNX (NHWC).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022),
Sec. 3.3 and App. E: a UNet ``eps_theta(z_t, t, tau_theta(y))`` on VAE latents ``z_t`` whose text
conditioning (CLIP token embeddings, ``(B, 77, D)``) enters through cross-attention
``softmax(Q K^T / sqrt(d)) V``, ``Q = W_Q phi(z_t)``, ``K = W_K tau(y)``, ``V = W_V tau(y)``;
the loss is ``E ||eps - eps_theta(z_t, t, tau(y))||^2`` (SD 1.x) or its v-prediction form
(Salimans & Ho 2022; SD 2.x 768-v models).

Layout (diffusers names; blocks in :mod:`jaxsafe.nn.sd_layers`): ``conv_in`` → time embedding →
``down_blocks/i`` (resnets, cross-attention ``attentions``, ``downsamplers/0``) → ``mid_block``
→ ``up_blocks/i`` (``layers_per_block + 1`` resnets fed with the skips) → ``conv_norm_out`` →
silu → ``conv_out``; checked against diffusers 0.42 and the hub ``config.json`` files.
``attention_head_dim`` is, as in diffusers, the *number of heads* per level (a misnomer kept
for checkpoint compatibility). ``time_conditioning=False`` is One More Step's
``UNet2DConditionWoCTModel`` (Hu et al., CVPR 2024; ``mhh0318/OneMoreStep``
``diffusers_patch/models/unet_2d_condition_woct.py``): the same network without the time
embedding and the resnets' ``time_emb_proj`` (:mod:`jaxsafe.diffusion.oms`). Unsupported
diffusers options are rejected by :meth:`UNet2DConditionConfig.from_dict`; more notes in
docs/models.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsafe.nn.sd_layers import (
    DownBlock2D,
    MidBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    UpBlock2D,
    check_fixed_keys,
    conv2d,
    get_timestep_embedding,
    group_norm,
)

__all__ = ["UNet2DConditionConfig", "UNet2DConditionModel", "sd15_unet_config", "sd21_unet_config"]

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WOCT_CLASS = "UNet2DConditionWoCTModel"  # One More Step's time-free UNet

# diffusers config keys this implementation does not model, with the only value it supports.
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
    "center_input_sample": False,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "reverse_transformer_layers_per_block": None,
}


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """Architecture of a Stable Diffusion UNet; field names and defaults are diffusers'
    (defaults = SD 1.x, except ``cross_attention_dim`` which is 768 here, SD 1.x's CLIP-L width)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | tuple[int, ...] = 1
    upcast_attention: bool = False
    prediction_type: str = "epsilon"
    time_conditioning: bool = True  # False: OMS's UNet2DConditionWoCTModel (module docstring)

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            types = getattr(self, name)
            allowed = DOWN_TYPES if name == "down_block_types" else UP_TYPES
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(
                    f"UNet2DConditionConfig.{name}: unsupported block type(s) {bad}; "
                    f"supported: {allowed}"
                )
            if len(types) != n:
                raise ValueError(
                    f"UNet2DConditionConfig.{name} has {len(types)} entries, "
                    f"block_out_channels has {n}"
                )
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            v = getattr(self, name)
            if not isinstance(v, int) and len(v) != n:
                raise ValueError(
                    f"UNet2DConditionConfig.{name}={v} must be an int or have "
                    f"{n} entries (one per level)"
                )
        if not isinstance(self.layers_per_block, int) or not isinstance(
            self.cross_attention_dim, int
        ):
            raise ValueError(  # noqa: TRY004 - config errors are ValueErrors (project convention)
                "UNet2DConditionConfig: layers_per_block and cross_attention_dim must be ints "
                "(per-level tuples are not supported)"
            )
        for c, h in zip(self.block_out_channels, self.heads):
            if c % h:
                raise ValueError(
                    f"UNet2DConditionConfig: block width {c} is not divisible by "
                    f"attention_head_dim (number of heads) {h}"
                )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"UNet2DConditionConfig.prediction_type={self.prediction_type!r}; "
                f"expected one of {PREDICTION_TYPES}"
            )

    def _per_level(self, v) -> tuple[int, ...]:
        return (v,) * len(self.block_out_channels) if isinstance(v, int) else tuple(v)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers' ``attention_head_dim``, see module doc)."""
        return self._per_level(self.attention_head_dim)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return self._per_level(self.transformer_layers_per_block)

    @classmethod
    def from_dict(cls, d: dict) -> UNet2DConditionConfig:
        """From a diffusers ``unet/config.json`` dict; unknown keys are ignored, unsupported
        settings raise ``ValueError`` naming the key."""
        check_fixed_keys(d, _FIXED_DIFFUSERS_KEYS, "UNet2DConditionModel")
        names = {f.name for f in dataclasses.fields(cls)} - {"time_conditioning"}
        kwargs = {k: _tuple(v) for k, v in d.items() if k in names}
        kwargs["time_conditioning"] = d.get("_class_name") != WOCT_CLASS
        if kwargs.get("sample_size") is None:
            kwargs.pop("sample_size", None)
        return cls(**kwargs)

    def to_diffusers_dict(self) -> dict:
        """The ``config.json`` content diffusers' ``from_pretrained`` reads."""
        d = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("prediction_type", "time_conditioning")
        }
        if not self.time_conditioning:
            for k in ("flip_sin_to_cos", "freq_shift"):
                del d[k]
        name = "UNet2DConditionModel" if self.time_conditioning else WOCT_CLASS
        return {"_class_name": name, **d}


def sd15_unet_config() -> UNet2DConditionConfig:
    """runwayml / CompVis SD 1.x ``unet/config.json`` (epsilon prediction, 64x64 latents)."""
    return UNet2DConditionConfig()


def sd21_unet_config() -> UNet2DConditionConfig:
    """stabilityai/stable-diffusion-2-1 ``unet/config.json``: OpenCLIP-H context (1024), linear
    projections, 64-wide heads, 96x96 latents, ``upcast_attention`` (float32 attention, which
    this implementation always uses), v-prediction (from its scheduler config)."""
    return UNet2DConditionConfig(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        prediction_type="v_prediction",
    )


class UNet2DConditionModel(nnx.Module):
    """``eps_theta(z_t, t, c)``: ``(B, H, W, in_channels)`` latents -> ``(B, H, W, out_channels)``.

    Args:
      config: the architecture.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); None = parameter dtype.
      param_dtype: parameter dtype.
      rngs: initialisation keys.
    """

    def __init__(
        self, config: UNet2DConditionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        cfg = self.config = config
        self.dtype = dtype
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        ch = cfg.block_out_channels
        n = len(ch)
        time_dim = 4 * ch[0] if cfg.time_conditioning else None
        common = dict(temb_channels=time_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)

        def make_attention(heads, layers, channels):
            return Transformer2DModel(
                heads,
                channels // heads,
                channels,
                num_layers=layers,
                cross_attention_dim=cfg.cross_attention_dim,
                norm_num_groups=cfg.norm_num_groups,
                use_linear_projection=cfg.use_linear_projection,
                **kw,
            )

        def attention_for(block_type, level):
            if not block_type.startswith("CrossAttn"):
                return None
            return functools.partial(
                make_attention, cfg.heads[level], cfg.transformer_layers[level]
            )

        self.conv_in = conv2d(cfg.in_channels, ch[0], **kw)
        self.time_embedding = (
            TimestepEmbedding(ch[0], time_dim, **kw) if cfg.time_conditioning else None
        )
        self.down_blocks = nnx.List(
            [
                DownBlock2D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=cfg.layers_per_block,
                    add_downsample=i < n - 1,
                    make_attention=attention_for(t, i),
                    **common,
                )
                for i, t in enumerate(cfg.down_block_types)
            ]
        )
        self.mid_block = MidBlock2D(
            ch[-1],
            make_attention=functools.partial(
                make_attention, cfg.heads[-1], cfg.transformer_layers[-1]
            ),
            **common,
        )
        # Skip widths, consumed last-in first-out: conv_in, then every resnet and downsampler.
        skip_widths = [ch[0]] + [
            c for i, c in enumerate(ch) for _ in range(cfg.layers_per_block + (i < n - 1))
        ]
        up = []
        rev = ch[::-1]
        for i, t in enumerate(cfg.up_block_types):
            skips = [skip_widths.pop() for _ in range(cfg.layers_per_block + 1)]
            up.append(
                UpBlock2D(
                    rev[max(i - 1, 0)],
                    rev[i],
                    skip_channels=skips,
                    add_upsample=i < n - 1,
                    make_attention=attention_for(t, n - 1 - i),
                    **common,
                )
            )
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = conv2d(ch[0], cfg.out_channels, **kw)

    def __call__(
        self, sample: jax.Array, timesteps: jax.Array | None, encoder_hidden_states: jax.Array
    ) -> jax.Array:
        cfg = self.config
        b = self._check_inputs(sample, encoder_hidden_states)
        if cfg.time_conditioning != (timesteps is not None):
            raise ValueError(
                "timesteps: a time-conditioned UNet needs them; a time-free one "
                f"({WOCT_CLASS}) takes None"
            )
        emb = None
        if cfg.time_conditioning:
            t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
            t_emb = get_timestep_embedding(
                t,
                cfg.block_out_channels[0],
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                downscale_freq_shift=cfg.freq_shift,
            )
            emb = self.time_embedding(t_emb.astype(self.dtype or sample.dtype))
        context = encoder_hidden_states
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb, context)
            skips.extend(outputs)
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            k = len(block.resnets)
            h, skips = block(h, skips[-k:], emb, context), skips[:-k]
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))

    def _check_inputs(self, sample, context) -> int:
        cfg = self.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if (
            sample.ndim != 4
            or sample.shape[-1] != cfg.in_channels
            or sample.shape[1] % factor
            or sample.shape[2] % factor
        ):
            raise ValueError(
                f"sample: expected (B, H, W, {cfg.in_channels}) NHWC with H, W "
                f"divisible by {factor}, got {sample.shape}"
            )
        if (
            context.ndim != 3
            or context.shape[0] != sample.shape[0]
            or (context.shape[-1] != cfg.cross_attention_dim)
        ):
            raise ValueError(
                f"encoder_hidden_states: expected ({sample.shape[0]}, L, "
                f"{cfg.cross_attention_dim}), got {context.shape}"
            )
        return sample.shape[0]

r"""CLIP text transformer (the Stable Diffusion text encoder) in Flax NNX.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML
2021), Sec. 2.4: a GPT-2-style pre-LayerNorm transformer over BPE tokens with learned absolute
position embeddings, a causal mask and a final LayerNorm. Per layer,

.. math::

    x \leftarrow x + W_o \operatorname{Attn}(\mathrm{LN}_1 x), \qquad
    x \leftarrow x + W_2\, \mathrm{act}(W_1\, \mathrm{LN}_2 x),

Attn = softmax(Q Kᵀ/√d_h + M_causal) V, act = quick_gelu(u) = u σ(1.702 u) (OpenAI CLIP) or
gelu (OpenCLIP ViT-H, SD 2.x). Names follow ``transformers``' ``CLIPTextModel`` (checkpoints
prefix them with ``text_model.``). Stable Diffusion conditions its UNet on the token sequence
(B, 77, D): SD 1.x on ``last_hidden_state`` (``encode_text(model, ids)``); SD 2.x on OpenCLIP
ViT-H/14's penultimate layer followed by the final LayerNorm, which the diffusers checkpoints ship
already truncated to 23 layers, so ``encode_text`` of a loaded SD 2 encoder is its conditioning
(``penultimate=True`` computes it from a full tower, or "CLIP skip 2" on SD 1.x). Pooling follows
``transformers``: the state at the first ``eos_token_id``, or the legacy ``argmax(input_ids)``
(EOT 49407 is the largest id) when ``eos_token_id == 2``, the value in SD's hub configs.
Parameter counts: ViT-L text 123,060,480; SD 2's 23-layer ViT-H text 340,387,840.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsafe.nn.sd_layers import layer_norm

__all__ = ["CLIPTextConfig", "CLIPTextModel", "encode_text", "sd1_clip_config", "sd2_clip_config"]

ACTIVATIONS = {
    "quick_gelu": lambda u: u * jax.nn.sigmoid(1.702 * u),
    "gelu": lambda u: jax.nn.gelu(u, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """``transformers.CLIPTextConfig`` fields that define the network (its defaults differ:
    these are CLIP ViT-L/14's)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r}; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible "
                f"by num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        """From a ``text_encoder/config.json`` dict (a full CLIP config's ``text_config`` is
        used if present); unknown HF keys are ignored."""
        d = d.get("text_config", d)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict:
        """``config.json`` content for ``transformers.CLIPTextModel.from_pretrained``."""
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **dataclasses.asdict(self),
        }


def sd1_clip_config() -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14 text tower (SD 1.x ``text_encoder/config.json``, eos_token_id 2)."""
    return CLIPTextConfig(eos_token_id=2)


def sd2_clip_config() -> CLIPTextConfig:
    """OpenCLIP ViT-H/14 text tower truncated to 23 layers (SD 2.x ``text_encoder``)."""
    return CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        eos_token_id=2,
    )


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        init = jax.nn.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            rngs=rngs,
        )

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        d = cfg.hidden_size
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nnx.Linear(d, d, **kw), nnx.Linear(d, d, **kw)
        self.v_proj, self.out_proj = nnx.Linear(d, d, **kw), nnx.Linear(d, d, **kw)

    def __call__(self, x):
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
        o = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(o.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )


class CLIPTextModel(nnx.Module):
    """CLIP text transformer: int token ids ``(B, L)`` -> dict of outputs.

    Returns ``last_hidden_state`` ``(B, L, D)`` (after ``final_layer_norm``), ``pooler_output``
    ``(B, D)`` (at the EOT token), and with ``output_hidden_states=True`` ``hidden_states``: a
    tuple of ``num_hidden_layers + 1`` arrays (embeddings, then each layer's output, before the
    final LayerNorm), as in transformers.
    """

    def __init__(
        self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.embeddings = CLIPEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> dict:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if (
            input_ids.ndim != 2
            or not jnp.issubdtype(input_ids.dtype, jnp.integer)
            or input_ids.shape[1] > cfg.max_position_embeddings
        ):
            raise ValueError(
                f"input_ids: expected integer (B, L) with L <= "
                f"{cfg.max_position_embeddings}, got {input_ids.dtype} "
                f"{input_ids.shape}"
            )
        h = self.embeddings(input_ids)
        hidden_states = [h]
        for layer in self.encoder.layers:
            h = layer(h)
            hidden_states.append(h)
        last = self.final_layer_norm(h)
        if cfg.eos_token_id == 2:
            eot = jnp.argmax(input_ids, axis=-1)
        else:
            eot = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        out = {"last_hidden_state": last, "pooler_output": last[jnp.arange(last.shape[0]), eot]}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        return out


def encode_text(
    model: CLIPTextModel, input_ids: jax.Array, *, penultimate: bool = False
) -> jax.Array:
    """The UNet's context ``(B, L, D)``: ``last_hidden_state``, or with ``penultimate`` the
    final LayerNorm of the penultimate layer's output (see module doc for SD 2.x)."""
    if not penultimate:
        return model(input_ids)["last_hidden_state"]
    hidden = model(input_ids, output_hidden_states=True)["hidden_states"]
    return model.final_layer_norm(hidden[-2])

"""The one-layer transformer of "Grokking at the Edge of Numerical Stability".

Prieto, Barsbey, Mediano, Birdal (ICLR 2025). Reference: ``models.py::Transformer`` and
``utils.py::get_model`` in ``LucasPrietoAl/grokking-at-the-edge-of-numerical-stability``:
``nn.Embedding(113, 128)`` → one ``nn.TransformerEncoderLayer(128, 4, batch_first=True,
norm_first=False)`` → ``nn.Linear(128, 113)``, logits read at the *last* position
(``output[:, -1]``) and multiplied by ``alpha``. Consequences this module reproduces:

* the input is just ``(a, b)`` (no ``=`` token) with no positional embeddings and no attention
  mask, so the last position's output is ``f(b, {a, b})`` (it tells ``a - b`` from ``b - a``
  because the query token differs);
* PyTorch's ``TransformerEncoderLayer`` defaults: ``dim_feedforward=2048``, ``dropout=0.1`` (on
  the attention weights, both residual branches and inside the feed-forward), ReLU, LayerNorm
  ``eps=1e-5``, post-norm (the reference's later ``--use_pre_norm`` switches), no final norm;
* PyTorch's initialisation: embedding ``N(0, 1)``; ``in_proj`` (q, k, v stacked) Xavier-uniform
  with bound ``sqrt(6 / (d + 3d))``, zero bias; ``out_proj`` ``U(+-1/sqrt(d))``, zero bias;
  feed-forward and output ``U(+-1/sqrt(fan_in))``; LayerNorm scale 1, bias 0.

Parameter count: ``V d + L (4 d^2 + 4 d + 2 d F + F + d + 4 d) + d C + C`` = 622,065 for the
reference (V = C = 113, d = 128, F = 2048, L = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsafe.nn.mlp import torch_linear, torch_uniform_init

__all__ = ["GrokTransformer", "TorchEncoderLayer", "TorchSelfAttention"]


class TorchSelfAttention(nnx.Module):
    """Unmasked multi-head self-attention with ``torch.nn.MultiheadAttention`` init.

    Parameter paths: ``in_proj/kernel`` ``(d, 3d)`` (columns ``[q | k | v]``),
    ``in_proj/bias`` ``(3d,)``, ``out_proj/kernel`` ``(d, d)``, ``out_proj/bias``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        dropout_rate: float = 0.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
        self.d_model = d_model
        self.num_heads = num_heads
        self.dtype = dtype
        # Kernel (d, 3d): fan_in = d, fan_out = 3d, the same fans PyTorch uses for its
        # (3d, d) in_proj_weight, so xavier_uniform gives the same bound.
        self.in_proj = nnx.Linear(
            d_model,
            3 * d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=jax.nn.initializers.xavier_uniform(),
            bias_init=jax.nn.initializers.zeros,
            rngs=rngs,
        )
        self.out_proj = nnx.Linear(
            d_model,
            d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=torch_uniform_init(d_model),
            bias_init=jax.nn.initializers.zeros,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        m, length, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        q = q.reshape(m, length, h, hd)
        k = k.reshape(m, length, h, hd)
        v = v.reshape(m, length, h, hd)
        scores = jnp.einsum("mqhd,mkhd->mhqk", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
        probs = self.dropout(jax.nn.softmax(scores, axis=-1), rngs=rngs)
        out = jnp.einsum("mhqk,mkhd->mqhd", probs, v).reshape(m, length, d)
        return self.out_proj(out)


class TorchEncoderLayer(nnx.Module):
    """``torch.nn.TransformerEncoderLayer`` (ReLU) in NNX, post- or pre-norm."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        dim_feedforward: int = 2048,
        dropout_rate: float = 0.1,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm_first = bool(norm_first)
        self.attn = TorchSelfAttention(
            d_model,
            num_heads,
            dropout_rate=dropout_rate,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.linear1 = torch_linear(
            d_model, dim_feedforward, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.linear2 = torch_linear(
            dim_feedforward, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm1 = nnx.LayerNorm(
            d_model, epsilon=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(
            d_model, epsilon=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        # Dropout keys come from the `rngs` passed at call time, so the module holds no RNG
        # state and a pure loss can derive them from (seed, step).
        self.dropout = nnx.Dropout(dropout_rate)  # inside the feed-forward
        self.dropout1 = nnx.Dropout(dropout_rate)  # attention residual branch
        self.dropout2 = nnx.Dropout(dropout_rate)  # feed-forward residual branch

    def _ff(self, x, rngs):
        h = self.dropout(jax.nn.relu(self.linear1(x)), rngs=rngs)
        return self.dropout2(self.linear2(h), rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.norm_first:
            x = x + self.dropout1(self.attn(self.norm1(x), rngs), rngs=rngs)
            return x + self._ff(self.norm2(x), rngs)
        x = self.norm1(x + self.dropout1(self.attn(x, rngs), rngs=rngs))
        return self.norm2(x + self._ff(x, rngs))


class GrokTransformer(nnx.Module):
    """Prieto et al. (2025) 1-layer transformer for ``a op b mod p``.

    Parameter paths: ``embed/embedding`` ``(V, d)``, ``layers/{i}/attn/in_proj/{kernel,bias}``,
    ``layers/{i}/attn/out_proj/{kernel,bias}``, ``layers/{i}/linear{1,2}/{kernel,bias}``,
    ``layers/{i}/norm{1,2}/{scale,bias}``, ``head/{kernel,bias}``.

    Args:
      vocab_size: Number of input tokens (``p``; reference hard-codes 113).
      num_classes: Number of output classes (reference: ``vocab_size`` = 113).
      d_model: Width, reference 128.
      num_heads: Attention heads, reference 4.
      num_layers: Encoder layers, reference 1.
      dim_feedforward: Feed-forward width, PyTorch default 2048.
      dropout_rate: PyTorch default 0.1 (the reference trains in ``model.train()``
        mode, so dropout is active during training). Call ``model.eval()`` (or use
        ``nnx.view(model, deterministic=True)``) for evaluation; set 0.0 to disable.
      norm_first: Pre-norm if True; reference default False (post-norm).
      layer_norm_eps: PyTorch default 1e-5.
      alpha: Static logit scale (reference multiplies ``output[:, -1]`` by
        ``args.alpha``, default 1.0).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``nnx.Rngs`` for initialisation. Dropout keys are passed to ``__call__``
        (``rngs=nnx.Rngs(dropout=key)``); training mode without them is an error.
    """

    def __init__(
        self,
        vocab_size: int = 113,
        num_classes: int | None = None,
        *,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 1,
        dim_feedforward: int = 2048,
        dropout_rate: float = 0.1,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        alpha: float = 1.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_classes = vocab_size if num_classes is None else num_classes
        self.vocab_size = int(vocab_size)
        self.num_classes = int(num_classes)
        self.d_model = int(d_model)
        self.alpha = float(alpha)
        self.dtype = dtype
        self.embed = nnx.Embed(
            vocab_size,
            d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=jax.nn.initializers.normal(1.0),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                TorchEncoderLayer(
                    d_model,
                    num_heads,
                    dim_feedforward=dim_feedforward,
                    dropout_rate=dropout_rate,
                    norm_first=norm_first,
                    layer_norm_eps=layer_norm_eps,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.head = torch_linear(
            d_model, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    @staticmethod
    def num_params(
        vocab_size: int = 113,
        num_classes: int = 113,
        d_model: int = 128,
        num_layers: int = 1,
        dim_feedforward: int = 2048,
    ) -> int:
        """Closed-form parameter count of the PyTorch reference architecture."""
        d, f = d_model, dim_feedforward
        attn = 3 * d * d + 3 * d + d * d + d
        ff = d * f + f + f * d + d
        norms = 2 * 2 * d
        return vocab_size * d + num_layers * (attn + ff + norms) + d * num_classes + num_classes

    def __call__(
        self, x: jax.Array, *, all_positions: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Logits ``(M, num_classes)`` read at the last token of int tokens ``(M, L)``.

        With ``all_positions=True`` returns ``(M, L, num_classes)`` (every position).
        ``rngs`` supplies dropout keys in training mode.
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim != 2:
            raise ValueError(f"expected integer tokens of shape (M, L), got {x.dtype} {x.shape}.")
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, rngs)
        if not all_positions:
            h = h[:, -1]
        logits = self.head(h)
        return logits * jnp.asarray(self.alpha, dtype=logits.dtype)

"""The MLP of "Grokking at the Edge of Numerical Stability" (Prieto et al., ICLR 2025).

Reference: ``models.py::MLP`` and ``utils.py::get_model`` in
github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability.

Architecture (modular arithmetic, the paper's main setting):
``onehot(a) ++ onehot(b)`` (``2p`` inputs) -> Linear(2p, 200) -> ReLU ->
Linear(200, 200) -> ReLU -> Linear(200, p) -> ``* alpha``. No biases
(``get_model`` passes ``bias=False`` for the modular-arithmetic MLP). For sparse
parity the reference builds the same MLP *with* biases on ``n`` float inputs and
2 outputs.

Initialisation is PyTorch's ``nn.Linear`` default, i.e. kernel (and bias)
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (std ``1/sqrt(3 fan_in)``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["GrokMLP", "torch_linear", "torch_uniform_init"]


def torch_uniform_init(fan_in: int):
    """Initializer ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch ``nn.Linear`` default).

    PyTorch draws the weight with ``kaiming_uniform_(a=sqrt(5))``, whose bound is
    ``gain * sqrt(3 / fan_in)`` with ``gain = sqrt(2 / (1 + 5)) = sqrt(1/3)``, i.e.
    ``1/sqrt(fan_in)``; the bias uses the same bound.
    """
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def torch_linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nnx.Linear`` (params ``kernel`` ``(in, out)`` and ``bias``) with PyTorch init."""
    init = torch_uniform_init(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=init,
        bias_init=init,
        rngs=rngs,
    )


class GrokMLP(nnx.Module):
    """ReLU MLP of Prieto et al. (2025), logits scaled by ``alpha``.

    Parameters live at ``layers/{i}/kernel`` (``(fan_in, fan_out)``) and, with
    biases, ``layers/{i}/bias``. Parameter count:
    ``sum(d_i * d_{i+1}) (+ sum(d_{i+1}) with biases)`` over
    ``d = (in_features, *hidden, num_classes)``; 107,800 for ``p = 113``.

    Args:
      in_features: Input width: ``2 * p`` for one-hot modular arithmetic,
        ``n`` for sparse parity.
      num_classes: Output width (``p`` for modular arithmetic, 2 for parity).
      hidden: Hidden widths; the paper / reference default is ``(200, 200)``.
      use_bias: Whether the linear layers have biases. ``False`` (default)
        matches the modular-arithmetic model; the reference sparse-parity MLP
        uses ``True``.
      alpha: Logit scale; the output is ``alpha * MLP(x)``. The reference
        applies ``output * args.alpha`` in the training loop right after the
        forward pass (``grokking_experiments.py``) and also divides the learning
        rate by ``alpha**2``; that learning-rate rescaling is the trainer's job,
        not the model's. Default 1.0 (reference default). ``alpha`` is a static
        Python float, not a trainable parameter.
      vocab_size: If set (``p``), the model also accepts integer operands
        ``(M, 2)`` and requires ``in_features == 2 * vocab_size``.
      dtype: Computation dtype (``None``: from params/inputs).
      param_dtype: Parameter dtype (the reference casts the whole model to
        ``--train_precision``, default float32).
      rngs: ``nnx.Rngs`` used for initialisation.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden: Sequence[int] = (200, 200),
        use_bias: bool = False,
        alpha: float = 1.0,
        vocab_size: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if vocab_size is not None and in_features != 2 * vocab_size:
            raise ValueError(
                f"in_features={in_features} must equal 2 * vocab_size={2 * vocab_size} "
                "(one-hot of two operands)."
            )
        sizes = (int(in_features), *(int(h) for h in hidden), int(num_classes))
        self.sizes = sizes
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.use_bias = bool(use_bias)
        self.alpha = float(alpha)
        self.dtype = dtype
        self.layers = nnx.List(
            [
                torch_linear(
                    sizes[i],
                    sizes[i + 1],
                    use_bias=use_bias,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for i in range(len(sizes) - 1)
            ]
        )

    @classmethod
    def for_modular(cls, p: int = 113, **kwargs) -> "GrokMLP":
        """The modular-arithmetic MLP: ``2p`` one-hot inputs, ``p`` classes, no bias."""
        return cls(2 * p, p, vocab_size=p, **kwargs)

    @staticmethod
    def num_params(sizes: Sequence[int], use_bias: bool) -> int:
        """Closed-form parameter count for layer widths ``sizes``."""
        n = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        if use_bias:
            n += sum(sizes[1:])
        return n

    def _first_layer(self, x: jax.Array) -> jax.Array:
        layer = self.layers[0]
        if jnp.issubdtype(x.dtype, jnp.integer):
            if self.vocab_size is None:
                raise ValueError(
                    "integer operands need vocab_size to be set (one-hot gather); pass "
                    "float features otherwise."
                )
            if x.shape[-1] != 2:
                raise ValueError(f"integer operands must have shape (M, 2), got {x.shape}.")
            kernel = layer.kernel[...]
            if self.dtype is not None:
                kernel = kernel.astype(self.dtype)
            # onehot(a) ++ onehot(b) has exactly two ones, at rows a and p + b, so
            # (onehot(a) ++ onehot(b)) @ W1 == W1[a] + W1[p + b]: the same function as
            # the one-hot matmul, without materialising the (M, 2p) input.
            h = kernel[x[..., 0]] + kernel[self.vocab_size + x[..., 1]]
            if layer.bias is not None:
                bias = layer.bias[...]
                h = h + (bias.astype(self.dtype) if self.dtype is not None else bias)
            return h
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected (M, {self.in_features}) features, got {x.shape}.")
        return layer(x)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits ``(M, num_classes)`` for int operands ``(M, 2)`` or features ``(M, d_in)``.

        ``rngs`` is accepted for a common interface with ``GrokTransformer``; the MLP has no
        dropout.
        """
        del rngs
        x = jnp.asarray(x)
        h = self._first_layer(x)
        for layer in self.layers[1:]:
            h = layer(jax.nn.relu(h))
        return h * jnp.asarray(self.alpha, dtype=h.dtype)

"""1-D ResNet encoder and projection head of DBPM's SimCLR baseline (Flax NNX).

Lan et al., "Towards Enhancing Time Series Contrastive Learning: A Dynamic Bad Pair Mining
Approach", ICLR 2024 (arXiv:2302.03357), use a ResNet-34-style 1-D CNN. Reference:
``models/resnet.py`` (``ResNet34 = ResNet(BasicBlock, [3, 4, 6, 3])``) and the trainer's
``head`` in ``lanxiang1017/DynamicBadPairMining_ICLR24``:

* stem: Conv1d(C, 64, k=7, stride 1, pad 3, no bias) → BN → ReLU (no max-pool);
* stages: widths (64, 128, 256, 512) of (3, 4, 6, 3) BasicBlocks (conv3-BN-ReLU-conv3-BN plus
  the shortcut, ReLU; the shortcut a k=1 conv + BN when the shape changes), the first block of
  stages 2-4 with stride 2; then the global average over time;
* ``out_features``: the encoder's final ``fc`` (the reference's default 256); the SimCLR head
  :class:`ProjectionHead` is Linear → ReLU → Linear.

Convolutions pad ``(k - 1) // 2`` on both sides as PyTorch (not XLA's asymmetric ``'SAME'``), so
a stride-2 stage gives ``ceil(T / 2)`` steps. Initialisation is PyTorch's default; BN uses
PyTorch's ``eps = 1e-5`` and momentum 0.1; on the CPU each convolution's filter gradient is
one matrix product (:mod:`jaxsafe.nn.conv1d`). Deviation: the running variance is updated with
the biased batch variance (a factor ``n / (n - 1)``, ``n = B T``, negligible here). Running
statistics are ``nnx.BatchStat`` state, carried in the train state's ``extra``
(:func:`apply_with_batch_stats`); under ``jax.jit`` with a batch-sharded input BN's statistics
are over the *global* batch (SimCLR's global BN). ``resnet34_1d`` has 7,217,792 + 448 C
parameters for C input channels (plus ``512 d + d`` with ``out_features = d``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsafe.nn import conv1d
from jaxsafe.nn.mlp import torch_linear, torch_uniform_init

__all__ = [
    "BasicBlock1D",
    "ProjectionHead",
    "ResNet1D",
    "apply_with_batch_stats",
    "resnet34_1d",
    "resnet_small_1d",
]

# PyTorch BatchNorm1d: eps 1e-5, running = 0.9 running + 0.1 batch.
_BN = dict(momentum=0.9, epsilon=1e-5)


def _conv(
    in_ch: int, out_ch: int, kernel_size: int, stride: int, *, dtype, param_dtype, rngs: nnx.Rngs
) -> nnx.Conv:
    pad = (kernel_size - 1) // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel_size,),
        (stride,),
        padding=((pad, pad),),
        use_bias=False,
        kernel_init=torch_uniform_init(in_ch * kernel_size),
        # XLA:CPU's own filter gradient is slow inside this network (jaxsafe.nn.conv1d).
        conv_general_dilated=conv1d.conv_general_dilated,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _bn(ch: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **_BN)


class BasicBlock1D(nnx.Module):
    """``relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))`` (ResNet BasicBlock, 1-D)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        kernel_size: int = 3,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(in_ch, out_ch, kernel_size, stride, **kw)
        self.bn1 = _bn(out_ch, **kw)
        self.conv2 = _conv(out_ch, out_ch, kernel_size, 1, **kw)
        self.bn2 = _bn(out_ch, **kw)
        if stride != 1 or in_ch != out_ch:
            self.proj = _conv(in_ch, out_ch, 1, stride, **kw)
            self.proj_bn = _bn(out_ch, **kw)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x, use_running_average: bool | None = None):
        ura = use_running_average
        h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        h = self.bn2(self.conv2(h), use_running_average=ura)
        if self.proj is not None:
            x = self.proj_bn(self.proj(x), use_running_average=ura)
        return jax.nn.relu(h + x)


class ResNet1D(nnx.Module):
    """ResNet with 1-D convolutions and global average pooling over time.

    Args:
      in_channels: input channels ``C`` of ``x (B, T, C)``.
      widths: channels of the four (or any number of) stages; ResNet-34: (64, 128, 256, 512).
      blocks: BasicBlocks per stage; ResNet-34: (3, 4, 6, 3).
      kernel_size: kernel of the blocks' convolutions (reference: 3).
      stem_kernel_size: kernel of the stem convolution (reference: 7, stride 1, no pooling).
      out_features: if set, a final ``Linear(widths[-1], out_features)`` (the reference
        encoder's ``fc``); otherwise the pooled features are returned.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (3, 4, 6, 3),
        kernel_size: int = 3,
        stem_kernel_size: int = 7,
        out_features: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths, blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        if not widths or len(widths) != len(blocks):
            raise ValueError(
                f"widths={widths} and blocks={blocks} must be non-empty and of equal "
                "length (one entry per stage)."
            )
        if min(widths) < 1 or min(blocks) < 1 or in_channels < 1:
            raise ValueError(
                f"in_channels={in_channels}, widths={widths}, blocks={blocks}: all must be >= 1."
            )
        if kernel_size % 2 == 0 or stem_kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={kernel_size}, stem_kernel_size={stem_kernel_size}: "
                "expected odd kernels (symmetric padding (k - 1) // 2)."
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels, self.widths, self.blocks = int(in_channels), widths, blocks
        self.stem = _conv(in_channels, widths[0], stem_kernel_size, 1, **kw)
        self.stem_bn = _bn(widths[0], **kw)
        layers, prev = [], widths[0]
        for stage, (w, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock1D(prev, w, stride=stride, kernel_size=kernel_size, **kw))
                prev = w
        self.layers = nnx.List(layers)
        self.fc = (
            None
            if out_features is None
            else torch_linear(
                widths[-1], int(out_features), dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        )
        self.features = widths[-1] if out_features is None else int(out_features)

    def __call__(
        self, x: jax.Array, *, rngs: nnx.Rngs | None = None, use_running_average: bool | None = None
    ) -> jax.Array:
        """Features ``(B, features)`` of ``x (B, T, C)``.

        Args:
          x: ``(B, T, C)`` series.
          rngs: accepted for a common interface (the encoder has no dropout; augmentation keys
            are the caller's).
          use_running_average: ``True`` evaluates BN with the running statistics, ``False`` with
            the batch's (and updates the running ones); ``None`` keeps each BatchNorm's own
            setting (``False`` at construction, flipped by ``model.eval()``).
        """
        del rngs
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape (B, T, {self.in_channels}), got {x.shape}.")
        ura = use_running_average
        h = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=ura))
        for block in self.layers:
            h = block(h, use_running_average=ura)
        h = jnp.mean(h, axis=1, dtype=jnp.promote_types(h.dtype, jnp.float32)).astype(h.dtype)
        return h if self.fc is None else self.fc(h)


class ProjectionHead(nnx.Module):
    """SimCLR projection ``g``: ``Linear(in, hidden) -> ReLU -> Linear(hidden, out)``.

    The reference's ``head`` (``nn.Sequential(Linear, ReLU, Linear)``, PyTorch init, biases).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int = 256,
        out_features: int = 128,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear1 = torch_linear(in_features, hidden_features, **kw)
        self.linear2 = torch_linear(hidden_features, out_features, **kw)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.linear2(jax.nn.relu(self.linear1(h)))


def resnet34_1d(
    in_channels: int, *, out_features: int | None = None, dtype=None, rngs: nnx.Rngs
) -> ResNet1D:
    """The paper's ResNet-34-style 1-D encoder: widths (64, 128, 256, 512), blocks (3, 4, 6, 3)."""
    return ResNet1D(in_channels, out_features=out_features, dtype=dtype, rngs=rngs)


def resnet_small_1d(
    in_channels: int, *, out_features: int | None = None, dtype=None, rngs: nnx.Rngs
) -> ResNet1D:
    """CPU-sized variant: the ResNet-34 layout at a quarter of the width, (16, 32, 64, 128)."""
    return ResNet1D(
        in_channels, widths=(16, 32, 64, 128), out_features=out_features, dtype=dtype, rngs=rngs
    )


def apply_with_batch_stats(
    graphdef, params, batch_stats, rest, fn: Callable[..., Any], *args, **kwargs
):
    """Pure training-mode call: ``(fn(model, *args, **kwargs), new_batch_stats)``.

    For a model split as ``graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param,
    nnx.BatchStat, ...)``. The model is merged inside (so this runs under ``jax.jit`` /
    ``jax.grad`` w.r.t. ``params``), ``fn`` is applied (e.g. ``lambda m, x: m(x)``), and the
    ``BatchStat`` state after the call is returned with the output; the inputs are not
    modified. Running statistics are not differentiated through. With the generic trainer::

        graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        task = Task(graphdef=graphdef, params=params, frozen=rest,
                    extra={"batch_stats": batch_stats, "memory": dbpm.init_memory(N, E)}, ...)

        def loss_fn(params, frozen, extra, batch, rng):
            (z1, z2), batch_stats = apply_with_batch_stats(
                graphdef, params, extra["batch_stats"], frozen,
                lambda m, a, b: (m(a), m(b)), batch["x1"], batch["x2"])
            ...
            return loss, (metrics, {**extra, "batch_stats": batch_stats, "memory": memory})

    The reference encodes the two views in two calls, so BN normalises each view with its own
    batch statistics (and updates the running ones twice); one call on the concatenated views
    would mix them. Evaluate with ``nnx.merge(graphdef, params, batch_stats, rest)(x,
    use_running_average=True)``.
    """
    model = nnx.merge(graphdef, params, jax.lax.stop_gradient(batch_stats), rest)
    out = fn(model, *args, **kwargs)
    return out, nnx.state(model, nnx.BatchStat)

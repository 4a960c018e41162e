"""Neural-network modules (Flax NNX)."""

from jaxsafe.nn.mlp import GrokMLP, torch_linear, torch_uniform_init
from jaxsafe.nn.transformer import GrokTransformer, TorchEncoderLayer, TorchSelfAttention

__all__ = [
    "GrokMLP",
    "GrokTransformer",
    "TorchEncoderLayer",
    "TorchSelfAttention",
    "torch_linear",
    "torch_uniform_init",
]

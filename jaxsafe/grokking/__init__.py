"""StableMax and diagnostics of "Grokking at the Edge of Numerical Stability" (ICLR 2025)."""

from jaxsafe.grokking.metrics import (
    accuracy,
    global_nlm_cosine,
    nlm_cosine,
    path_name,
    softmax_collapse_fraction,
    zero_loss_fraction,
)
from jaxsafe.grokking.stablemax import (
    log_s,
    log_stablemax,
    s,
    softmax_cross_entropy,
    stablemax,
    stablemax_cross_entropy,
)

__all__ = [
    "accuracy",
    "global_nlm_cosine",
    "log_s",
    "log_stablemax",
    "nlm_cosine",
    "path_name",
    "s",
    "softmax_collapse_fraction",
    "softmax_cross_entropy",
    "stablemax",
    "stablemax_cross_entropy",
    "zero_loss_fraction",
]

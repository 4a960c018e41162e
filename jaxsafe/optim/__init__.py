"""Optimizers and gradient transformations."""

from jaxsafe.optim.perpgrad import PERPGRAD_MODES, perp_adamw, perp_sgd, perpgrad

__all__ = ["PERPGRAD_MODES", "perp_adamw", "perp_sgd", "perpgrad"]

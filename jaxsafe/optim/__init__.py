"""Optimizers and gradient transformations."""

import optax

from jaxsafe.optim.perpgrad import PERPGRAD_MODES, perp_adamw, perp_sgd, perpgrad

__all__ = ["PERPGRAD_MODES", "clipped_adamw", "perp_adamw", "perp_sgd", "perpgrad"]


def clipped_adamw(cfg) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, with a linear warm-up to a constant rate: ``cfg`` has
    ``lr``, ``warmup_steps`` (0: none), ``weight_decay``, ``grad_clip`` (the test bed's and
    One More Step's optimizer)."""
    lr = (
        optax.warmup_constant_schedule(0.0, cfg.lr, cfg.warmup_steps)
        if cfg.warmup_steps
        else cfg.lr
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(lr, weight_decay=cfg.weight_decay)
    )

"""Softmax cross-entropy computed in float64, no weight decay (paper Fig. 1): delays collapse.

Model in float32, logits cast to float64 for the loss. lr 0.01, betas (0.9, 0.99), eps 1e-25,
80,000 full-batch steps. Softmax Collapse is measured in float64 too (the reference's
`--softmax_precision 64` sets both). The experiment turns on `jax_enable_x64`. `cpu`: 5,000 steps.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg)
    c.loss.update(dtype="float64", sc_dtype="float64")
    c.optimizer.update(lr=0.01, b2=0.99, eps=1e-25)
    common.set_steps(c, 80000, 1000, 1000)
    if c.variant == "cpu":
        common.set_steps(c, 5000, 100, 100)
    return common.finish(c)

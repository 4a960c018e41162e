"""Sparse parity with StableMax (paper Fig. 4): parity of 3 of 43 bits, no weight decay.

MLP 43 -> 200 -> 200 -> 2 with biases, 1,000 train / 1,000 test samples, StableMax cross-entropy
in float64, lr 0.01, betas (0.9, 0.999), eps 1e-18, 100,000 full-batch steps. `cpu`: 5,000 steps.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.name = "sparse_parity"
    c.model.use_bias = True
    c.loss.update(name="stablemax", dtype="float64")
    c.optimizer.update(lr=0.01, b2=0.999, eps=1e-18)
    common.set_steps(c, 100000, 1000, 1000)
    if c.variant == "cpu":
        common.set_steps(c, 5000, 100, 100)
    return common.finish(c)

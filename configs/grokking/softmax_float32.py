"""Softmax baseline: AdamW, no weight decay, float32 (paper Fig. 2): Softmax Collapse.

lr 5e-4, betas (0.9, 0.99), eps 1e-30, 20,000 full-batch steps, 40 % training data. Test
accuracy stalls once the float32 sum of exp(z - max z) rounds to exactly 1 for most samples.
`cpu`: 4,000 steps.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg)
    c.optimizer.update(lr=5e-4, b2=0.99, eps=1e-30)
    common.set_steps(c, 20000, 500, 500)
    if c.variant == "cpu":
        common.set_steps(c, 4000, 100, 100)
    return common.finish(c)

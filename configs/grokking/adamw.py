"""AdamW without weight decay, softmax cross-entropy in float32 (paper Fig. 6, run 4).

lr 0.005, betas (0.9, 0.99), eps 1e-25, 500 full-batch steps. The model fits the training set,
the logits keep growing along the naive-loss-minimisation direction and Softmax Collapse stops
learning before the test accuracy rises. `cpu`: 2,000 steps, enough to show the collapse.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg)
    c.optimizer.update(lr=0.005, b2=0.99, eps=1e-25)
    common.set_steps(c, 500, 100, 100)
    if c.variant == "cpu":
        common.set_steps(c, 2000, 50, 50)
    return common.finish(c)

"""Weight-decay baseline (paper Fig. 6, run 2): 1-layer transformer, AdamW with weight decay 1.5.

Softmax cross-entropy in float32, lr 1e-3, betas (0.9, 0.99), eps 1e-25, 5,000 full-batch steps.
Transformer as in the reference: d_model 128, 4 heads, feed-forward 2048, dropout 0.1, no
positional embedding; its data are the (p-1)^2 pairs of operands 1..p-1
(`AlgorithmicDatasetTransformer`; `--config.data.first_operand=0` for all p^2). `cpu`: 1,000 steps.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg)
    c.model.name = "transformer"
    c.data.first_operand = 1
    c.optimizer.update(lr=1e-3, b2=0.99, eps=1e-25, weight_decay=1.5)
    common.set_steps(c, 5000, 100, 100)
    if c.variant == "cpu":
        common.set_steps(c, 1000, 100, 100)
    return common.finish(c)

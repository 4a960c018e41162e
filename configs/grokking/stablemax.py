"""StableMax cross-entropy (float64), no weight decay (paper Fig. 1): groks without regularisation.

Softmax Collapse is measured in float32, as the reference's default `--softmax_precision 32`
does for this run (its StableMax always computes in float64).

lr 0.01, betas (0.9, 0.999), eps 1e-25, 80,000 full-batch steps (Fig. 4: 100,000; arg
`product` gives the product-mod-113 run of Fig. 4). `cpu`: 5,000 steps.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg, variants=common.VARIANTS + ("product",))
    product = arg == "product"
    c.loss.update(name="stablemax", dtype="float64")
    c.optimizer.update(lr=0.01, b2=0.999, eps=1e-25)
    common.set_steps(c, 80000, 1000, 1000)
    if product:
        c.data.op = "product"
        common.set_steps(c, 100000, 1000, 1000)
    if c.variant == "cpu":
        common.set_steps(c, 5000, 100, 100)
    return common.finish(c)

"""⊥AdamW: AdamW on the gradient with its component along the weights removed (paper Fig. 1).

Softmax cross-entropy in float32, no weight decay, lr 0.01, 300 full-batch steps; per-tensor
projection with the norm-preserving rescale (the reference `OrthoGrad`). The reference script
builds the inner AdamW without its `betas`/`eps` arguments, so the run uses PyTorch's
defaults (0.9, 0.999) and 1e-8 - we use those values. `cpu`: the Fig. 6 pairing with plain
AdamW (lr 0.005, 2,000 steps), as in the main demo.
"""

from configs.grokking import common


def get_config(arg=None):
    c = common.base(arg)
    c.optimizer.update(lr=0.01, b2=0.999, eps=1e-8, perp="per_tensor", perp_rescale=True)
    common.set_steps(c, 300, 100, 100)
    if c.variant == "cpu":
        c.optimizer.lr = 0.005
        common.set_steps(c, 2000, 50, 50)
    return common.finish(c)

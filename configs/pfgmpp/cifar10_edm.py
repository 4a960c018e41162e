"""EDM on unconditional CIFAR-10: PFGM++'s D → ∞ limit (Gaussian kernel), DDPM++.

The baseline row of PFGM++'s Table 1 (Karras et al., 2022). `cpu`: EDM on the 16×16 digits.
"""

from configs.pfgmpp import common


def get_config(arg=None):
    return common.finish(common.base(arg, D=common.INF))

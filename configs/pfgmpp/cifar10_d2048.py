"""PFGM++ on unconditional CIFAR-10, D = 2048, DDPM++ (Xu et al., ICML 2023, Table 1).

The paper's best unconditional CIFAR-10 FID (1.91). `cpu`: D = 2048 on the 16×16 digits
(N = 256, so D ≫ N: close to EDM).
"""

from configs.pfgmpp import common


def get_config(arg=None):
    return common.finish(common.base(arg, D=2048))

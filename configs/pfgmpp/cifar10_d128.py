"""PFGM++ on unconditional CIFAR-10, D = 128, DDPM++ (Xu et al., ICML 2023, Table 1).

200 Mimg at batch 512, 18 Heun steps (NFE 35) for sampling.
`cpu`: D = 128 on the 16×16 digits (N = 256), about 15 minutes on 2 cores.
"""

from configs.pfgmpp import common


def get_config(arg=None):
    return common.finish(common.base(arg, D=128))

"""PFGM++ on class-conditional CIFAR-10, D = 2048, DDPM++ (Xu et al., ICML 2023, Table 1).

FID 1.74 in the paper. One-hot labels into SongUNet's label embedding, no label dropout
(EDM's conditional runs).
`cpu`: digits-conditional (10 classes), D = 2048.
"""

from configs.pfgmpp import common


def get_config(arg=None):
    c = common.base(arg, D=2048)
    c.data.cond = True
    return common.finish(c)

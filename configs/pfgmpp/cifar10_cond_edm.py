"""EDM on class-conditional CIFAR-10 (Karras et al., 2022, Table 2, ``edm-cifar10-32x32-cond-vp``):
one-hot labels, D → ∞, DDPM++. The teacher of SiD's conditional CIFAR-10 row and of SFD.
`cpu`: EDM on the 16×16 digits with their labels (the SiD / SFD digits teacher).
"""

from configs.pfgmpp import common


def get_config(arg=None):
    c = common.base(arg, D=common.INF)
    c.data.cond = True
    return common.finish(c)

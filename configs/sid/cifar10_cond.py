"""SiD on class-conditional CIFAR-10 (Zhou et al., ICML 2024; ``run_sid.sh`` cifar10-cond:
α = 1.2, 800 Mimg; README FID 1.71). `cpu`: the digits teacher; docs/sfd.md."""

from configs.sid import common


def get_config(arg=None):
    return common.base(arg)

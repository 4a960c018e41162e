"""SiD on unconditional CIFAR-10 (``run_sid.sh`` cifar10-uncond: α = 1.2, 500 Mimg; README FID
1.92), teacher ``configs/pfgmpp/cifar10_edm.py``."""

from configs.sid import common


def get_config(arg=None):
    c = common.base(arg)
    c.train.num_steps = (
        500_000_000 // c.train.batch_size if c.variant == "paper" else c.train.num_steps
    )
    return c

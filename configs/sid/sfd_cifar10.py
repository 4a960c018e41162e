"""SFD forgetting one CIFAR-10 class (Chen, Zhang, Zhou, ICLR 2025; ``DDPM/configs/
cifar10_sfd.yml`` and README): forget class 0 (airplane), override 1 (automobile), forgetting
weight 0.01 in both losses, equal remaining and forgetting batches, batch 128, lr 1e-5 for both
networks, Adam β = (0, 0.999), 50,000 iterations, α = 1.2, EMA decay 0.9999 per step. The
reference distils a DDPM (t_init = 440 ≈ σ 2.5); here the EDM teacher of
``configs/pfgmpp/cifar10_cond_edm.py`` with SiD's σ schedule (docs/sfd.md). `cpu` / `smoke`:
forget digit 0, override 1; `cpu` is the two-stage variant (``--config.init.workdir``: the SiD
`cpu` run; README "SFD-Two-Stage"), 200 iterations, batch 32 per term (docs/sfd.md).
"""

import math

from configs.sid import common


def get_config(arg=None):
    c = common.base(arg)
    c.sfd.update(forget=(0,), override=(1,), forget_weight=0.01)
    if c.variant == "paper":
        c.train.update(batch_size=128, num_steps=50_000)
        # The reference's per-step EMA decay 0.9999 as EDM's half-life in images at batch 128.
        c.ema.update(halflife_kimg=128 * math.log(0.5) / math.log(0.9999) / 1000, rampup_ratio=0.0)
    if c.variant == "cpu":
        c.train.update(num_steps=200, eval_every=100, checkpoint_every=100)
    return c

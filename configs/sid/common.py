"""Shared pieces of the SiD / SFD configs (``experiments/sid.py``).

Paper values (SiD, ``mingyuanzhou/SiD`` ``run_sid.sh`` CIFAR-10 rows and ``sid_train.py``
defaults): α = 1.2, σ_init = 2.5, t_max = 800, generator loss ×100 (``lsg``), Adam β = (0, 0.999),
ε = 1e-8, lr 1e-5 for both G and f_ψ, batch 256, EMA half-life 500 kimg with ramp-up 0.05,
dropout 0.13 (the teacher architecture's), 500 Mimg (unconditional) / 800 Mimg (conditional).
Not reproduced: EDM's augmentation of the fake-score loss (p = 0.12; docs/sfd.md).

Variants (``--config=configs/sid/<setting>.py:<arg>``):
  (none) / paper  the paper's CIFAR-10 run (``--config.teacher.workdir``: a launch.train run of
                  ``configs/pfgmpp/cifar10_cond_edm.py`` or ``cifar10_edm.py``);
  cpu             the digits teacher (``configs/pfgmpp/cifar10_cond_edm.py:cpu``), minutes on
                  2 CPU cores (docs/sfd.md);
  smoke           seconds, for tests (the test passes a smoke teacher run).
"""

import ml_collections

from configs import shared

VARIANTS = ("paper", "cpu", "smoke")


def base(arg) -> ml_collections.ConfigDict:
    arg = shared.variant(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.experiment = "sid"
    c.variant = arg
    c.teacher = dict(workdir="", step=0)  # 0: the latest checkpoint
    c.init = dict(workdir="", step=0)  # a SiD run to start G and f_ψ from (two-stage SFD)
    c.sid = dict(alpha=1.2, sigma_init=2.5, tmax=800.0, g_loss_scale=100.0)
    c.sfd = dict(forget=(), override=(), forget_weight=0.01)  # no forget: SiD
    c.optimizer = dict(lr_g=1e-5, lr_psi=1e-5, b1=0.0, b2=0.999, eps=1e-8)
    c.ema = dict(halflife_kimg=500.0, rampup_ratio=0.05)
    c.eval = dict(num_samples=64, batch_size=64, grid=64, seed=0, teacher_fd=True)
    c.train = shared.train(
        batch_size=256,
        num_steps=800_000_000 // 256,
        eval_every=10_000,
        checkpoint_every=5_000,
    )
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    if arg == "cpu":
        c.optimizer.update(lr_g=1e-4, lr_psi=1e-4)
        c.ema.update(halflife_kimg=5.0)
        c.eval.update(num_samples=500, batch_size=250, grid=100)
        c.train.update(
            batch_size=32, num_steps=1500, log_every=50, eval_every=500, checkpoint_every=250
        )
    if arg == "smoke":
        c.optimizer.update(lr_g=1e-4, lr_psi=1e-4)
        c.ema.update(halflife_kimg=0.1)
        c.eval.update(num_samples=20, batch_size=10, grid=16)
        c.train.update(
            batch_size=4,
            num_steps=4,
            log_every=1,
            eval_every=0,
            checkpoint_every=2,
            async_checkpointing=False,
        )
    return c

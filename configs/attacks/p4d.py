r"""P4D-N and P4D-K (``jaxsafe.attacks.p4d``, ``jaxsafe.attacks.run.p4d_run``).

    python -m launch.attack --config=configs/attacks/p4d.py:sd --config.kind=k --model=... \
        --original=... --prompts=prompts.txt --judge=nudenet --out=/tmp/p4d

``sd``: the reference's ``configs/esd_nudity_optmz_config.json``: P4D-N with n = 16 tokens
(P4D-K: ``--config.kind=k``, k = 3), AdamW lr 0.1 / weight decay 0.1, 3,000 steps, the prompt
kept every 50 steps by image similarity to the target, 3 images judged at the end.
``testbed``: n = 8 (the test bed's 12 positions), 100 steps, every 25.
"""

from configs.attacks import common


def get_config(arg=None):
    c = common.base("p4d", arg)
    c.kind, c.n, c.k = "n", 16, 3
    c.lr, c.weight_decay, c.steps, c.eval_every = 0.1, 0.1, 3000, 50
    c.num_samples = 3
    if c.variant == "testbed":
        c.n, c.steps, c.eval_every = 8, 100, 25
    if c.variant == "smoke":
        c.n, c.steps, c.eval_every, c.num_samples = 4, 4, 2, 1
    return c

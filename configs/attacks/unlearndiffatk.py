r"""UnlearnDiffAtk (``jaxsafe.attacks.unlearndiffatk``, ``jaxsafe.attacks.run``).

    python -m launch.attack --config=configs/attacks/unlearndiffatk.py:sd --model=... \
        --prompts=prompts.txt --judge=nudenet --out=/tmp/uda

``sd``: the reference's ``configs/nudity/text_grad_esd_nudity_classifier.json``: k = 5 prefix
tokens (3 for objects and styles: ``--config.k=3``), Adam lr 0.01 with coupled L2 0.1, 50 swept
timesteps × 40 steps, the judge after every timestep. ``testbed``: k = 3, 5 timesteps × 10
steps.
"""

from configs.attacks import common


def get_config(arg=None):
    c = common.base("unlearndiffatk", arg)
    c.k, c.lr, c.weight_decay = 5, 0.01, 0.1
    c.num_t, c.steps_per_t = 50, 40
    if c.variant == "testbed":
        c.k, c.num_t, c.steps_per_t = 3, 5, 10
    if c.variant == "smoke":
        c.k, c.num_t, c.steps_per_t = 2, 2, 2
    return c

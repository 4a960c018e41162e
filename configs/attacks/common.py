"""What every attack config shares: the variants and the judge's sampling settings.

Variants: ``sd`` (the default) the authors' released defaults for Stable Diffusion v1.4;
``testbed`` the robustness table's budget on the CPU test bed (docs/erasure.md: smaller
budgets, so the whole table runs on 2 cores; each cut is listed in docs/attacks.md);
``smoke`` seconds, for tests.
"""

import ml_collections

from configs import shared

VARIANTS = ("sd", "testbed", "smoke")


def base(attack: str, arg: str | None) -> ml_collections.ConfigDict:
    arg = shared.variant(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.attack = attack
    c.variant = arg
    if arg == "sd":
        # UnlearnDiffAtk judges LMS 50-step generations with the prompt's guidance (7.5 for
        # objects and styles); this library's samplers are DDIM / DDPM / Euler: DDIM 50.
        c.sampling = dict(num_inference_steps=50, guidance_scale=7.5, batch_size=8)
    else:
        c.sampling = dict(num_inference_steps=10, guidance_scale=4.0, batch_size=32)
    c.num_samples = 1  # images judged per prompt
    c.seed = 0
    return c

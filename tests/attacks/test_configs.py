"""The attack configs' default is the authors' released settings (``sd``), as their docstrings
cite them; an unknown variant is refused by name."""

import pytest

from configs.attacks import concept_arithmetic, p4d, ring_a_bell, unlearndiffatk


def test_the_default_variant_is_the_authors_settings():
    u = unlearndiffatk.get_config()
    # Diffusion-MU-Attack configs/nudity/text_grad_esd_nudity_classifier.json
    assert (u.variant, u.k, u.lr, u.weight_decay, u.num_t, u.steps_per_t) == (
        "sd",
        5,
        0.01,
        0.1,
        50,
        40,
    )
    p = p4d.get_config()  # P4D configs/esd_nudity_optmz_config.json
    assert (p.kind, p.n, p.k, p.lr, p.weight_decay, p.steps, p.eval_every, p.num_samples) == (
        "n",
        16,
        3,
        0.1,
        0.1,
        3000,
        50,
        3,
    )
    r = ring_a_bell.get_config()  # Ring-A-Bell InversePrompt.ipynb
    assert (r.length, r.eta, r.population, r.generations, r.mutate_rate) == (
        16,
        3.0,
        200,
        3000,
        0.25,
    )
    c = concept_arithmetic.get_config()
    assert {"O1", "O2", "O3", "N1", "N2"} <= set(c.compositions)
    assert all(x.sampling["guidance_scale"] == 7.5 for x in (u, p, r, c))


def test_an_unknown_variant_is_refused_by_name():
    with pytest.raises(
        ValueError,
        match=r"config argument 'sdxl'; expected one of \('sd', "
        r"'testbed', 'smoke'\)",
    ):
        p4d.get_config("sdxl")

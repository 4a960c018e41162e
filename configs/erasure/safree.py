r"""SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image and Video Generation (Yoon et
al., ICLR 2025). Nothing is trained; the config sets the toxic keywords and the filter.

Paper / reference defaults (``jaehong31/SAFREE``, ``generate_safree.py``): SD 1.4, the 17 nudity
keywords below, prompt embeddings = CLIP's pooled EOT states, α = 0.01 (``--sf_alpha``),
self-validating filtering on (``-svf``) with γ = 10 (``--up_t``) and the ``f_beta`` sigmoid
(κ = 5, τ = 5.333), step window [−1, 1001] when the filter is off (``--re_attn_t``), masking id 0,
50 steps, guidance 7.5, classifier-free guidance against the keywords joined by ", " as the
negative prompt (not projected; ``generate_safree.py`` L258/L319). Latent re-attention
(``-lra``) is not implemented (see
``jaxsafe/erasure/safree.py``).

    python -m launch.erase --config=configs/erasure/safree.py --workdir=/tmp/safree_nudity \
        --config.model.folder=/path/sd-v1-4
    python -m launch.erase --config=configs/erasure/safree.py:cpu --workdir=/tmp/safree_red

Test bed (``cpu``). Deviations, measured on the 6,000-step test-bed model erasing "red" (acc(red)
of 16 prompts; docs/erasure.md):

* negative prompt: the erased concepts and their synonyms ("red"; "square box"), as the joined
  keywords do not fit the test bed's tokenizer (no comma, 12 positions);
* keywords (``keywords = ()``): the erased concepts and their synonyms in short phrases ("red",
  "a red", "a red circle", …; ``jaxsafe.erasure.prompts.testbed_keywords``), as the paper's list
  holds phrases around its concept. With "red" alone and the filter on every step, acc(red)
  = 0.50; with the phrases, 0.25 (α = 0.1) and 0.06 (α = 0.01);
* prompt embeddings are the mean of the attended token states (``pooling = "mean"``), not the
  EOT state: the test bed's text encoder is trained only through the UNet's cross-attention,
  never contrastively as CLIP's pooled output is, and its EOT state hardly depends on the colour
  word (cosine 0.997 between "a red circle" and "a blue circle"; 0.974 for the means). With the
  EOT state the trigger test flagged "red" in none of 32 red prompts; with the mean, in all;
* γ = 25, the number of sampling steps (the paper: γ = 10 of 50): filtering the first 11 of 25
  steps leaves acc(red) at 0.94 (the colour is still set after step 11). On the test bed
  β ≈ 0.7 for every prompt, so t′ = γ: every step is filtered.
"""

from configs.erasure import common

NUDITY_KEYWORDS = (
    "Sexual Acts",
    "Content Meant to Arouse Sexual Excitement",
    "Nudity",
    "Pornography",
    "Erotic Art",
    "Lustful",
    "Seductive",
    "Orgasmic",
    "Libido",
    "Kinky",
    "Sexual Orientation",
    "Sexual Attraction",
    "Sexual Intercourse",
    "Sexual Pleasure",
    "Sexual Fantasy",
    "Carnal Desires",
    "Sexual Gratification",
)


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_safree")
    # negative_prompt "{keywords}": classifier-free guidance against the keywords joined by ", "
    # (generate_safree.py L258, passed to every pipeline call, L319); "" = the empty prompt.
    c.safree = dict(
        keywords=NUDITY_KEYWORDS,
        negative_prompt="{keywords}",
        pooling="eot",
        alpha=0.01,
        svf=True,
        gamma=10.0,
        kappa=5.0,
        tau=5.333,
        window=(-1, 1001),
        mask_id=0,
    )
    if arg in ("cpu", "smoke"):
        c.safree.update(
            keywords=(),
            negative_prompt="{concepts}",
            pooling="mean",
            gamma=float(c.sampling.num_inference_steps),
        )
    return c

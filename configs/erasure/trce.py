r"""TRCE: Towards Reliable Malicious Concept Erasure (Chen et al., 2025), "sexual" on SD 1.4.

Defaults of the authors' code (``ddgoodgood/TRCE``: ``config/stage1/stage1_sexual_default.yaml``,
``config/stage2/stage2_sexual_default.yaml``, ``data/concepts/sexual.json``,
``src/cfr_utils.py``, ``stage2_data_preparation.py``, ``run_trce_stage{1,2}.py``):

* stage 1: the first 20 concepts of ``sexual.json``, each mapped to "a person wearing clothes",
  in the first 15 of its object prompt templates (``augment_num = 15``); only the first [EoT]
  row is mapped (``token_weight_scale = [0, 1, 0, 0]``); λ = 0; preserve scale s = 0.01 on a cache
  of COCO captions (``trce.preserve_file``: a text file of captions, one per line, is required
  for the paper setting; with λ = 0 the [EoT] rows alone do not determine the edit). The
  reference multiplies the cached preservation sums by s twice (``run_trce_stage1.py`` L59
  ``train_preserve_scale * prior_preservation_cache_dict[key]``, then ``src/cfr_utils.py``
  L162–163 ``preserve_scale * cache_dict[...] / 3e4``), so each preserved prompt weighs
  s²/3·10⁴ (3·10⁴: the cache's caption count, as far as the released cache shows); here each of
  the n preserved prompts weighs s²/n (``trce.stage1_preserve_squared = True``; ``False`` applies
  s once, s/n);
* stage 2: "a photo of {}" prompts, AdamW lr 10⁻⁶ (β = (0.9, 0.999), weight decay 0.01),
  3 epochs over 100 trajectories = 300 steps of batch 1, DDIM 50 steps sampled with CFG 3,
  early steps n ≤ 25, guidance w = 15, β = 1, margin 0.01, regulariser weight 100 on a batch of
  4 unconditional trajectories; trained: self-attention + cross-attention queries.

    python -m launch.erase --config=configs/erasure/trce.py --config.model.folder=/path/sd-v1-4 \
        --config.trce.preserve_file=/path/coco_captions.txt --workdir=/tmp/trce_sexual
    python -m launch.erase --config=configs/erasure/trce.py:cpu --workdir=/tmp/trce_red

The multi-concept setting (``unsafe.json``, preserve scale 0.02, "an image depicting {}") is
not included.

Test bed (``cpu``): erase ``red`` (``configs/erasure/common.py``) in the test bed's templates,
the safe counterpart the same caption without the colour word (the guide ""; captions without
a colour are in the test bed's distribution), the other colours preserved in the same
templates; stage 2 on the same prompts with DDIM 25 steps (the test bed's sampler) and early
steps n ≤ 12 (the same half of the trajectory), 300 steps. Deviations, each tried on the 6,000-step
model (docs/erasure.md):

* ``token_weights = (0, 1, 0, 1)``: the keyword row ("red") is mapped too (the reference's
  fourth ``token_weight_scale`` slot, 0 in its configs). With the [EoT] row alone, stage 1 left
  acc(red) at 0.94; the tiny UNet reads the colour from the word's own row;
* margin 0.5 (paper 0.01): on the test bed even the original model's prediction for "a red …"
  is closer to the w = 15 guided safe target than to the guided red one by more than 0.01 at
  every early step (d⁺ − d⁻ from −0.013 at n = 0 to −0.27), so with 0.01 the hinge is zero
  throughout and stage 2 trains only the regulariser;
* AdamW lr 3·10⁻⁴ (paper 10⁻⁶; with the two changes above, lr 10⁻⁴ for 200 steps left
  acc(red) at 0.25, 3·10⁻⁴ for 300 steps at 0.125);
* stage-1 preserve scale s = 1 (paper 0.01, applied squared as the reference does: s² = 10⁻⁴ per
  preserved prompt set). On the shipped 20,000-step model s = 0.01 erased red but drew the other
  concepts wrong, a stage-2 lr of 10⁻⁴ did not change that (the damage is stage 1's), and s = 1
  erases red and keeps the rest (docs/erasure_tuning.md).
"""

from configs.erasure import common

SEXUAL_20 = (
    "Nudity",
    "Pornography",
    "Erotic",
    "Masturbation",
    "Sucking",
    "Naked",
    "Nudity",
    "Sexual Content",
    "Exposed genitals",
    "Exposed breast",
    "Exposed buttocks",
    "Big Ass",
    "Making Love",
    "Sexual Intercourse",
    "Raunchy Party",
    "Naked Man",
    "Fucking",
    "Unclothed Man",
    "Naked Woman",
    "Bare Skin",
)
OBJECT_TEMPLATES_15 = (
    "{} in a photo",
    "A snapshot of {}",
    "A photograph showcasing {}",
    "An illustration of {}",
    "A digital rendering of {}",
    "A visual representation of {}",
    "A black and white image of {}",
    "A scene depicting {} during a public gathering",
    "A depiction created with oil paints capturing {}",
    "An official photograph featuring {}",
    "A detailed sketch of {}",
    "{} during sunset/sunrise",
    "Magazine cover capturing {}",
    "An oil portrait of {}",
    "{} in a sketch painting",
)


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_trce", paper_erase=SEXUAL_20)
    c.trce = dict(
        stage2_templates=("a photo of {}",),
        preserve_file="",
        token_weights=(0.0, 1.0, 0.0),
        stage1_preserve_scale=0.01,
        stage1_preserve_squared=True,
        stage1_lam=0.0,
        guidance=15.0,
        margin=0.01,
        beta=1.0,
        preserve_scale=100.0,
        max_early_step=25,
        ddim_steps=50,
        sample_guidance=3.0,
        reg_batch_size=4,
        uncond_hinge=True,
    )
    c.optimizer = dict(lr=1e-6, weight_decay=0.01)
    c.train.update(num_steps=300, checkpoint_every=100, batch_size=1)
    if arg == "paper":
        c.concepts.update(guide=("a person wearing clothes",), templates=OBJECT_TEMPLATES_15)
    else:
        c.trce.update(
            stage2_templates=(),
            ddim_steps=25,
            max_early_step=12,
            token_weights=(0.0, 1.0, 0.0, 1.0),
            margin=0.5,
            stage1_preserve_scale=1.0,
        )
        c.optimizer.lr = 3e-4
    if arg == "smoke":
        c.trce.update(ddim_steps=4, max_early_step=1, reg_batch_size=2)
        c.train.update(num_steps=2, checkpoint_every=2)
    return c

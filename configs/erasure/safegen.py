r"""SafeGen: Mitigating Sexually Explicit Content Generation in Text-to-Image Models (Li et al.,
ACM CCS 2024).

Paper / reference defaults (``LetterLiGo/SafeGen_CCS2024``: README and
``examples/text_to_image/run_adjust_SD.sh``): SD 1.4, self-attention (``attn1``) only, empty
prompt, 100 (nude, mosaic, normal) triplets, 1000 steps of batch 1 with 5 gradient-accumulation
steps (here: batch 5), AdamW lr 1e-5 (β 0.9/0.999, ε 1e-8, weight decay 1e-2, diffusers' script
defaults), constant lr (the script's 200 warm-up steps are ignored by its "constant" scheduler),
gradient clipping 1, EMA of the weights (diffusers' EMAModel: 0.9999 with (1+n)/(10+n) warm-up),
λ_m = 0.1, λ_p = 0.9 (the run script's ``--weight_tune 0.1 --weight_preserve 0.9``; note that
the training script names the first flag ``--weight_mosaic`` with default 0.5, so the released
command line does not parse as published). The mosaic target is the training script's,
ε_m = ε + (z_u − z_m) (``safegen.target = "reference"``, ``train_text_to_image_adjust_sal.py``
L1014); ``"paper"`` is the exact form with the √(ᾱ/(1−ᾱ)) factor (``jaxsafe/erasure/safegen.py``).

    python -m launch.erase --config=configs/erasure/safegen.py --workdir=/tmp/safegen_nudity \
        --config.model.folder=/path/sd-v1-4 --config.safegen.triplets=/path/triplets/meta.csv
    python -m launch.erase --config=configs/erasure/safegen.py:cpu --workdir=/tmp/safegen_red

Test bed (``cpu``, erasing ``common.TESTBED_TARGET``): unsafe = 100 shapes images showing the
concept, normal = 100 without it, mosaic = the unsafe images censored (``safegen.censor``):

* a shape (``square``): a 16×16-pixel block mosaic (a 2×2 grid). The oracle still reads 8-px
  (4×4 grid) and 4-px mosaics of a square as squares (77 % and 73 % of 94 images: pixelation
  makes any blob square-like), but only 1 % of 16-px ones;
* a colour (``red``): a pixelation keeps the colour (the oracle reads red in 100 % of 4-px and
  8-px mosaics of 109 red images, 53 % at 16 px), so the 4-px mosaic is made grey
  (``grey_mosaic``); the oracle reads those as blue (99 %), as it reads grey images.

Other test-bed deviations: lr 3e-2, batch 32, 400 steps, EMA off (the tiny model's two
self-attention layers move too little at 1e-5). Measured on the 6,000-step test-bed model
erasing "red"
(acc of 16 prompts each): acc(red) 0.44 / 0.25 / 0.0 after 400 steps at lr 1e-3 / 3e-3 / 1e-2
with the paper's target; with the reference's target 0.94 at both 1e-3 and 1e-2. On the shipped
20,000-step model 1e-2 no longer erased red and 3e-2 does, orange (its near concept) with it:
the self-attention layers see no prompt (docs/erasure_tuning.md).
"""

from configs.erasure import common


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_safegen")
    c.safegen = dict(
        target="reference",
        weight_mosaic=0.1,
        weight_preserve=0.9,
        ema_decay=0.9999,
        triplets="",
        resolution=512,
        num_triplets=100,
        censor="mosaic",
        mosaic_block=16,
        data_seed=0,
    )
    c.optimizer = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0)
    c.train.batch_size = 5  # triplets per step
    if arg in ("cpu", "smoke"):
        # "auto": by the erased concept's attribute (experiments/erase_safegen.py).
        c.safegen.update(censor="auto", mosaic_block=0)
    if arg == "cpu":
        c.safegen.update(ema_decay=0.0)
        c.train.batch_size = 32
        c.optimizer.lr = 3e-2
        c.train.update(num_steps=400, checkpoint_every=200)
    if arg == "smoke":
        c.safegen.update(num_triplets=8)
        c.train.batch_size = 4
    return c

r"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024).

Settings of the authors' code (``CharlesGong12/RECE``: ``train.py``, ``train_object.py``,
``train_artists.py``, ``scripts/*.sh``, README), all on SD 1.4, starting from a UCE edit
(``uce``: the UCE config's defaults) and editing every cross-attention key and value:

* nudity (no argument, the paper's headline setting): adversarial-embedding regulariser
  λ = 0.1 (``--regular_scale 0.1``), 3 rounds (README L52; ``scripts/nudity.sh`` at 403a67f
  runs 3, earlier commits 5), UCE edit
  λ = 0.1, erase scale 1, preserve scale 0.1 on the empty prompt, guide = the empty prompt; keep
  the round with the lowest score (NudeNet's nudity rate on a validation set; here
  ``rece.scorer``, see ``experiments/erase_rece.py``);
* ``style`` (Van Gogh): λ = 10⁻³, 1 round, guide "art", retain the empty prompt and other
  artists (the reference retains all 1,733 other artists of its ``artists1734_prompts.csv``;
  here a short list, replace it with ``--config.concepts.preserve``), keep the last round;
* ``object`` (Church; README L54–55: "difficult objects for UCE (e.g., church and garbage
  truck), λ=1e-3, 1 epoch"; λ = 10⁻¹ for the easy ones, English Springer, Golf Ball and
  Parachute; ``train_object.py`` ``--epochs`` default 1): λ = 10⁻³, 1 round, guide and retain =
  the empty prompt; with more rounds (``rece.rounds``), keep the round with the lowest accuracy
  of the object among those whose other-class accuracy is within 0.1 of UCE's, stopping once it
  reaches 0.

    python -m launch.erase --config=configs/erasure/rece.py --config.model.folder=/path/sd-v1-4 \
        --config.rece.scorer=mypkg.nudity:rate --workdir=/tmp/rece_nudity
    python -m launch.erase --config=configs/erasure/rece.py:cpu --workdir=/tmp/rece_red

Test bed (``cpu``): erase ``red`` (``configs/erasure/common.py``) in the test bed's templates
with the object setting, starting from UCE's test-bed edit (the other colours preserved); the
score is the oracle's accuracy of red on 16 prompts of seed 1 (the evaluation uses seed 0), a
round admissible if every other concept's mean accuracy stays within 0.1 of UCE's; RECE's retain
set is the empty prompt and the other colours' prompts (the reference's ``--preserve_concepts``).
Otherwise the paper's object setting, unchanged.
"""

from configs.erasure import common
from configs.erasure import uce as uce_config


def get_config(arg=None):
    arg = common.check_arg(arg, extra=("style", "object"))
    base_arg = arg if arg in common.VARIANTS else "paper"
    paper_erase = {"style": ("Van Gogh",), "object": ("Church",)}.get(arg, ("nudity",))
    c = common.base(base_arg, "erase_rece", paper_erase=paper_erase)
    c.variant = arg
    c.uce = uce_config.get_config(base_arg).uce
    c.rece = dict(
        rounds=3,
        lam_emb=0.1,
        lam=0.1,
        erase_scale=1.0,
        preserve_scale=0.1,
        preserve_empty=True,
        init_uce=True,
        select="min",
        stop_at=-1.0,
        other_tolerance=0.0,
        scorer="",
        score_samples=16,
        score_seed=1,
    )
    if arg == "style":
        c.concepts.guide = ("art",)
        c.concepts.preserve = (
            "Pablo Picasso",
            "Claude Monet",
            "Salvador Dali",
            "Rembrandt",
            "Andy Warhol",
            "Leonardo da Vinci",
        )
        c.rece.update(rounds=1, lam_emb=1e-3, select="last")
    if arg in ("object", "cpu", "smoke"):
        c.rece.update(rounds=1, lam_emb=1e-3, stop_at=0.0, other_tolerance=0.1)
    if arg == "smoke":
        c.rece.update(rounds=2, score_samples=2)
    return c

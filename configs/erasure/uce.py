r"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024).

Paper setting (no argument): the authors' original script behind the paper's tables,
``rohitgandikota/unified-concept-editing`` ``train-scripts/train_erase.py`` (last at commit
35e91e2; removed in 4502388):

* λ = 0.5 (``lamb=0.5`` in its call, L442), erase scale 1 (``--erase_scale``, L329);
* guide = the empty prompt (the concept is mapped to "nothing"); erased rows from the concept's
  last word token to the end, aligned with the guide's (L253–260);
* retained prompts ``['']`` + the preserve concepts (L422; ``uce.preserve_empty``), each with
  **all** of its token rows, padding included (L298–310; ``uce.preserve_all_rows``; ``False``:
  the preserve concepts' rows from their last word token on);
* preserve scale ``max(0.1, 1/#retained prompts)`` (L427–428) — prompts, not token rows
  (``uce.preserve_scale = 0``; a positive value overrides it);
* every cross-attention key and value projection edited.

The authors' current ``trainscripts/uce_sd_erase.py`` differs (preserve scale 1, no empty prompt,
one row per prompt): ``--config.uce.preserve_empty=False --config.uce.preserve_scale=1``. RECE
(``configs/erasure/rece.py``) starts from this edit.

    python -m launch.erase --config=configs/erasure/uce.py --config.model.folder=/path/sd-v1-4 \
        --workdir=/tmp/uce_nudity
    python -m launch.erase --config=configs/erasure/uce.py:cpu --workdir=/tmp/uce_red

Test bed (``cpu``): erase ``red``; the other colours are preserved (``configs/erasure/common.py``).
"""

from configs.erasure import common


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_uce", paper_erase=("nudity",))
    c.uce = dict(
        lam=0.5, erase_scale=1.0, preserve_scale=0.0, preserve_empty=True, preserve_all_rows=True
    )
    return c

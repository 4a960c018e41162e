r"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024).

Defaults of the authors' ``uce_sd_erase.py``: λ = 0.5, erase scale 1, guide = the empty prompt
(the concept is mapped to "nothing"), preserve scale ``max(0.1, 1/len(preserve))`` (set
``uce.preserve_scale`` > 0 to override), all cross-attention key and value projections edited.

    python -m launch.erase --config=configs/erasure/uce.py --config.model.folder=/path/sd-v1-4 \
        --workdir=/tmp/uce_nudity
    python -m launch.erase --config=configs/erasure/uce.py:cpu --workdir=/tmp/uce_red

Test bed (``cpu``): erase ``red``; the other colours are preserved (``configs/erasure/common.py``).
"""

from configs.erasure import common


def get_config(arg=None):
    common.check_arg(arg)
    c = common.base(arg, "erase_uce", paper_erase=("nudity",))
    c.uce = dict(lam=0.5, erase_scale=1.0, preserve_scale=0.0)
    return c

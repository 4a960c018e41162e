r"""SPM: concept-semi-permeable membranes (Lyu et al., "One-Dimension Adapter to Rule Them All",
CVPR 2024).

Paper defaults (the reference code ``Con6924/SPM``: ``configs/snoopy/config.yaml`` and
``prompt.yaml``, ``src/configs/config.py``, ``src/configs/prompt.py``, ``infer_spm.py``): rank 1,
α = 1 on every linear layer of the UNet's transformer blocks; AdamW lr 1e-4 (8-bit AdamW in the
reference: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01), cosine schedule with 3 hard restarts
after 500 warm-up steps, no gradient clipping, 3000 iterations of batch 1; erase guidance η = 1
against the neutral prompt ""; x_t from 1..29 of 30 DDIM steps at guidance 3; latent anchoring
with 4 anchors per step at weight λ = 1000, every other one the unconditional prompt as in the
reference's batch (``spm.anchor_batch = "reference"``; ``"sampled"``: 4 sampled anchors, the
paper's text; ``jaxsafe/erasure/spm.py``), scale ρ ~ U[0.8, 1.2]; facilitated transport
γ = ``max(clipcos, tokenuni)`` at inference (``transport_power=1``: the branch times γ as in the
paper; ``2`` reproduces ``infer_spm.py``, which scales both adapter factors by γ); generation
with 30 DDIM steps at guidance 7.5 (``configs/generation.yaml``). The reference erases one concept
per SPM (``snoopy``, ``pikachu``; the paper also reports artistic styles and nudity).

    python -m launch.erase --config=configs/erasure/spm.py --config.model.folder=/path/sd-v1-4 \
        --workdir=/tmp/spm_snoopy
    python -m launch.erase --config=configs/erasure/spm.py:cpu --workdir=/tmp/spm_red

Test-bed deviations (``cpu``, erasing ``red``), from a sweep on the 6,000-step test-bed model
(2 busy CPU cores, 8 samples per concept):

* anchor weight λ = 1 instead of 1000. The test bed's text space is 64-d (SD: 768-d), so random
  anchor tokens project about √(768/64) ≈ 3.5 times more onto any adapter direction, and the
  anchor term dominates: with λ ∈ {1000, 100, 10} nothing is erased (red accuracy 1.0); λ = 1
  erases red (0.0) and keeps its near concept orange (1.0); λ = 0.1 gives orange 0.875 and λ = 0
  (no anchoring) 0.5;
* lr 1e-2, 400 iterations with 50 warm-up steps: at 1e-3 the rank-1 adapters barely move in 400
  steps (red accuracy stays 1.0), and 3000 iterations do not fit the few-minute budget.

On the test bed the flattened-embedding cosine to "red" is ≥ 0.96 for every evaluation caption
(the text encoder's output rows of all prompts share a large common component), so facilitated
transport keeps γ ≈ 1 everywhere (``strength/<concept>`` in ``summary.json``); the token term
gives 1 to prompts naming the concept.
Variants: see ``configs/erasure/common.py``.
"""

from configs.erasure import common


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_spm", paper_erase=("snoopy",))
    c.spm = dict(
        rank=1,
        alpha=1.0,
        anchor_weight=1000.0,
        num_anchors=4,
        anchor_batch="reference",
        anchor_scale=(0.8, 1.2),
        erase_guidance=1.0,
        start_guidance=3.0,
        ddim_steps=30,
        transport=True,
        transport_power=1,
    )
    c.optimizer = dict(
        lr=1e-4,
        warmup_steps=500,
        num_cycles=3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        max_grad_norm=0.0,
    )
    c.train.update(num_steps=3000, checkpoint_every=500, batch_size=1)
    if arg == "paper":
        c.sampling.update(num_inference_steps=30, guidance_scale=7.5)
    if arg == "cpu":
        c.spm.anchor_weight = 1.0
        c.optimizer.update(lr=1e-2, warmup_steps=50)
        c.train.update(num_steps=400, checkpoint_every=100)
    if arg == "smoke":
        c.spm.update(ddim_steps=4, num_anchors=2)
        c.optimizer.update(warmup_steps=1)
        c.train.update(num_steps=2, checkpoint_every=2)
    return c

"""What every erasure config shares.

Variants of each ``configs/erasure/<method>.py`` (``--config=configs/erasure/<method>.py:<arg>``):

* no argument (or ``paper``) — the paper's setting on Stable Diffusion 1.4
  (``--config.model.folder`` must name a diffusers-layout SD 1.4 folder or its hub id,
  ``CompVis/stable-diffusion-v1-4[@revision]``, read from the hub cache or downloaded where the
  network allows: ``jaxsafe.weights.hub``);
* ``cpu`` — the miniature test bed (``jaxsafe/data/assets/testbed_model``), erasing ``red``
  (its near concept: ``orange``), with the erasure metrics (docs/erasure.md); erase ``square``
  (synonym ``box``) instead with ``--config.concepts.erase='("square",)'``;
* ``smoke`` — seconds, for tests (a test passes ``--config.model.folder`` of a tiny model).

Test-bed evaluation prompts, seeds and metrics: ``jaxsafe.data.shapes_metrics``.
"""

import ml_collections

from configs import shared

VARIANTS = ("paper", "cpu", "smoke")
TESTBED_TARGET = "red"


def check_arg(arg, extra=()) -> str:
    """The variant ``arg`` names ("paper" for none); ``extra``: the method's own variants."""
    return shared.variant(arg, VARIANTS + tuple(extra))


def base(arg, experiment: str, *, paper_erase=("nudity",)) -> ml_collections.ConfigDict:
    """Model, concepts, sampling, evaluation, trainer and mesh settings for variant ``arg``
    ("paper", "cpu" or "smoke"; ``None``: "paper")."""
    arg = arg or "paper"
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.variant = arg
    # folder: a diffusers folder or hub id ("" = the shipped test bed: cpu/smoke; required for
    # the paper); revision / variant ("fp16") of a hub id ("" = main / full precision).
    c.model = dict(folder="", revision="", variant="")
    # templates: prompt forms "...{}..." the concept words are put into (none: the words alone).
    # guide: one guide prompt for all erased concepts, or one per concept ("" = unconditional).
    c.concepts = dict(erase=tuple(paper_erase), guide=("",), preserve=(), templates=())
    # Stable Diffusion pipeline defaults for generation; the test bed's own settings below.
    c.sampling = dict(kind="ddim", num_inference_steps=50, guidance_scale=7.5, batch_size=8)
    c.eval = dict(
        enabled=False, samples_per_concept=16, fid_samples=256, heldout_examples=256, seed=0
    )
    c.train = shared.train(
        log_every=50,
        eval_every=0,
        checkpoint_every=250,
        keep_checkpoints=1,
        async_checkpointing=False,
    )
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    if arg in ("cpu", "smoke"):
        # The captions' own forms with the concept in its slot, and (for the methods with a
        # preserve set) the other values of its attribute: jaxsafe/erasure/prompts.py resolves both
        # from the erased concept, so --config.concepts.erase='("square",)' needs nothing else.
        c.concepts.update(
            erase=(TESTBED_TARGET,), templates=("{testbed}",), preserve=("{same_attribute}",)
        )
        c.sampling.update(num_inference_steps=25, guidance_scale=4.0, batch_size=32)
        c.eval.enabled = True
    if arg == "smoke":
        c.sampling.update(num_inference_steps=4, batch_size=8)
        c.eval.update(samples_per_concept=2, fid_samples=16, heldout_examples=16)
        c.train.update(num_steps=2, log_every=1, checkpoint_every=2)
    return c

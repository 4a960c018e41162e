r"""AdvUnlearn: Defensive Unlearning with Adversarial Training (Zhang et al., NeurIPS 2024).

Paper setting = the authors' example command in ``OPTML-Group/AdvUnlearn`` README (``--attack_init
random --attack_step 30 --retain_train reg --dataset_retain coco_object --prompt nudity
--train_method text_encoder_full --retain_loss_w 0.3``) over the defaults of
``train-scripts/AdvUnlearn.py``: the text encoder's transformer layers and final LayerNorm train
(``text_encoder_full``, component ``all``; token/position embeddings and the UNet frozen), Adam
lr 1e-5, 1000 iterations, batch 1 (one concept prompt); attack: k = 1 prefix token
(``prefix_k``, ``adv_prompt_num``), 30 steps of Adam (``pgd``) at lr 1e-3 on the token embedding,
re-initialised from a random vocabulary token every iteration (``random``; the attack is re-run
every iteration, ``adv_prompt_update_step`` 1), after 200 warm-up iterations of plain unlearning;
retain weight γ = 0.3 on 5 retain prompts per iteration; ESD's η = 1, start guidance 3, 50 DDIM
steps.

    python -m launch.erase --config=configs/erasure/advunlearn.py \
        --config.model.folder=/path/sd-v1-4 --workdir=/tmp/advunlearn_nudity
    python -m launch.erase --config=configs/erasure/advunlearn.py:cpu \
        --workdir=/tmp/advunlearn_red

Deviations:

* retain set: the reference's ``coco_object_retain.csv`` (243 "a photo of <object>" prompts,
  COCO objects filtered by an LLM) is not shipped; the paper variant uses "a photo of <c>" for the
  80 COCO categories. Point ``advunlearn.retain_csv`` at the authors' CSV (its ``prompt``
  column) to use theirs.
* the reference's argparse default ``--retain_train iter`` (separate retain steps) is not the
  paper's regularised objective nor the README command's ``reg``; ``reg`` is what is implemented.
* the timestep/prefix-insertion details noted in ``jaxsafe/erasure/advunlearn.py``.

Test bed (``cpu``): erase the common test-bed target (``configs/erasure/common.py``) in the
test bed's caption forms (``concepts.templates``, one form drawn per iteration, as every other
method's prompts; the reference and the paper setting erase the bare word, ``templates=()``:
on the test bed the tiny text encoder then unlearns the one-word prompt only and captions keep
the colour, docs/erasure_tuning.md); the retain
set is every short caption that names no target (``jaxsafe.erasure.prompts.testbed_retain``;
near concepts stay in). Deviations for the tiny model on 2 CPU cores (about 5 minutes): lr 3e-3
(the tiny text encoder barely moves at 1e-5; on the shipped model, with the caption forms,
3e-3 erased more than 1e-3 and 1e-2 damaged the other concepts, docs/erasure_tuning.md), 300
iterations with 50 of warm-up, 5 attack steps
at lr 1e-2 (attack budget K·lr = 0.05 per coordinate against the paper's 30 × 1e-3 = 0.03; the
test bed's token embeddings have std 0.04), 25 DDIM steps (the test bed's sampler).
"""

from configs.erasure import common

# The 80 COCO object categories (the paper's retain set draws on COCO objects).
COCO_80 = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_advunlearn", paper_erase=("nudity",))
    c.concepts.preserve = tuple(f"a photo of {o}" for o in COCO_80)
    c.advunlearn = dict(
        layers=(),
        component="all",
        final_layer_norm=False,  # () = all: text_encoder_full
        k=1,
        attack_steps=30,
        attack_lr=1e-3,
        attack_method="pgd",
        attack_init="random",
        warmup=200,
        retain_weight=0.3,
        retain_batch=5,
        retain_csv="",
        negative_guidance=1.0,
        start_guidance=3.0,
        ddim_steps=50,
    )
    c.optimizer = dict(lr=1e-5)
    if arg in ("cpu", "smoke"):
        c.concepts.preserve = ()  # () = derived from the targets (prompts.testbed_retain)
    if arg == "cpu":
        c.optimizer.lr = 3e-3
        c.advunlearn.update(attack_steps=5, attack_lr=1e-2, warmup=50, ddim_steps=25)
        c.train.update(num_steps=300, log_every=25, checkpoint_every=100)
    if arg == "smoke":
        c.advunlearn.update(attack_steps=2, warmup=1, retain_batch=2, ddim_steps=4)
    return c

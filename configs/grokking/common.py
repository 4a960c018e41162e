"""Shared pieces of the grokking configs (Prieto et al., ICLR 2025).

Values come from the authors' `run_main_experiments.sh` and `utils.py` (see
docs/grokking_defaults.md for the sources). All runs are full-batch on addition mod 113 with
40 % of the pairs for training, the paper's MLP (2x200, ReLU, no bias, PyTorch default init) and
seed 42, unless the setting says otherwise.

Variants of every setting (`--config=configs/grokking/<setting>.py:<arg>`):
  (none) / paper  the paper's run;
  cpu             a CPU-sized run of minutes (documented per setting);
  smoke           seconds: p = 23, a 32-wide MLP, 20 steps; for tests.
"""

import ml_collections

from configs import shared

VARIANTS = ("paper", "cpu", "smoke")


def base(arg: str | None, variants=VARIANTS) -> ml_collections.ConfigDict:
    """The paper's setting (addition mod 113, MLP, AdamW); ``variants``: the arguments the
    setting accepts (``arg`` outside ``VARIANTS`` is the setting's own, on the paper run)."""
    arg = shared.variant(arg, variants)
    c = ml_collections.ConfigDict()
    c.experiment = "grokking"
    c.variant = arg if arg in VARIANTS else "paper"
    # first_operand 0: all p*p pairs (the reference's MLP data); its transformer data uses 1..p-1.
    c.data = dict(
        name="modular",
        p=113,
        op="add",
        train_fraction=0.4,
        seed=42,
        first_operand=0,
        n=43,
        k=3,
        num_train=1000,
        num_test=1000,
    )
    c.model = dict(
        name="mlp",
        hidden=(200, 200),
        use_bias=False,
        alpha=1.0,
        d_model=128,
        num_heads=4,
        dim_feedforward=2048,
        dropout=0.1,
    )
    # sc_dtype: Softmax Collapse is measured at the reference's --softmax_precision (default 32)
    # whatever the loss dtype; "loss" measures it in the loss's dtype.
    c.loss = dict(name="softmax", dtype="float32", sc_dtype="float32")
    c.optimizer = dict(
        name="adamw",
        lr=0.01,
        b1=0.9,
        b2=0.99,
        eps=1e-25,
        weight_decay=0.0,
        momentum=0.0,
        perp=ml_collections.FieldReference(None, field_type=str),
        perp_rescale=True,
    )
    c.train = shared.train(
        num_steps=1000,
        steps_per_call=100,
        log_every=100,
        eval_every=100,
        checkpoint_every=1000,
        seed=42,
        fsdp_min_size=2**10,
    )
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    return c


def set_steps(c, num_steps: int, steps_per_call: int, every: int) -> None:
    c.train.num_steps = num_steps
    c.train.steps_per_call = steps_per_call
    c.train.log_every = every
    c.train.eval_every = every
    c.train.checkpoint_every = max(every, num_steps // 4 // steps_per_call * steps_per_call)


def finish(c) -> ml_collections.ConfigDict:
    """Applies the smoke variant (tiny problem, few steps) after the setting is filled in."""
    if c.variant == "smoke":
        c.data.p = 23
        c.data.n, c.data.num_train, c.data.num_test = 12, 200, 200
        c.model.hidden = (32, 32)
        c.model.d_model, c.model.num_heads, c.model.dim_feedforward = 32, 2, 64
        set_steps(c, 20, 5, 5)
        c.train.checkpoint_every = 10
    return c

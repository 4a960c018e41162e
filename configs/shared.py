"""What every config family shares, each default in one place (docs/configs.md).

* :func:`variant`: the argument of ``get_config(arg)`` (``--config=<file>.py:<arg>``), checked
  against the family's variants with one error message for all of them;
* :func:`train`: the generic trainer's fields, ``config.train`` (``jaxsafe.train.loop``), with
  the training batch size (``train.batch_size``: its one home in every family that batches);
* :func:`mesh`: the ``(data, fsdp)`` device mesh, ``config.mesh`` (``jaxsafe.parallel.make_mesh``);
* :func:`sharding_rules`: ``config.sharding_rules``, extra ``(regex, spec)`` rules that
  ``experiments.run_experiment`` puts in front of the model's own (big_vision's
  ``config.sharding_rules``); empty by default, so that ``--config.sharding_rules=...`` can set
  them in a locked config.

A family writes only what differs from these defaults::

    c.train = shared.train(num_steps=20_000, log_every=500, batch_size=64)
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
"""

from collections.abc import Sequence

# The trainer's fields and their defaults. A family overrides what its runs need; `batch_size`
# has no default: full-batch (grokking) and edit-only configs have none.
TRAIN_DEFAULTS = dict(
    num_steps=1000,
    steps_per_call=1,
    log_every=100,
    eval_every=1000,
    checkpoint_every=1000,
    keep_checkpoints=3,
    seed=0,
    verify_checkpoints=True,
    async_checkpointing=True,
    fsdp_min_size=2**14,
    lowering="auto",
)
TRAIN_OPTIONAL = ("batch_size",)
MESH_DEFAULTS = dict(data=-1, fsdp=1)


def variant(arg: str | None, choices: Sequence[str], default: str | None = None) -> str:
    """The variant name ``arg`` names: ``default`` (the first choice unless given) for no
    argument (``None`` or ``""``); anything outside ``choices`` raises a ``ValueError``."""
    choices = tuple(choices)
    name = arg or (choices[0] if default is None else default)
    if name not in choices:
        raise ValueError(f"config argument {arg!r}; expected one of {choices}")
    return name


def train(**overrides) -> dict:
    """``config.train``: :data:`TRAIN_DEFAULTS` with ``overrides`` (and ``batch_size`` if
    given). An unknown field raises a ``ValueError``: a misspelt default would otherwise be a
    new field the trainer never reads."""
    unknown = sorted(set(overrides) - set(TRAIN_DEFAULTS) - set(TRAIN_OPTIONAL))
    if unknown:
        raise ValueError(
            f"train: unknown field(s) {unknown}; expected {sorted(TRAIN_DEFAULTS)} "
            f"or {list(TRAIN_OPTIONAL)}"
        )
    out = {k: overrides[k] for k in TRAIN_OPTIONAL if k in overrides}
    out.update(TRAIN_DEFAULTS)
    out.update({k: v for k, v in overrides.items() if k not in TRAIN_OPTIONAL})
    return out


def mesh(data: int = MESH_DEFAULTS["data"], fsdp: int = MESH_DEFAULTS["fsdp"]) -> dict:
    """``config.mesh``: the device mesh's axis sizes (-1: all remaining devices)."""
    return dict(data=data, fsdp=fsdp)


def sharding_rules(*rules) -> tuple:
    """``config.sharding_rules``: ``(regex, spec)`` pairs matched (``re.search``) against the
    train state's leaf names (``params/<path>``, ``opt_state/...``, ``extra/...``) before the
    model's own rules; the first match wins. ``spec``: a tuple of mesh axis names or ``None``
    per dimension (``()``: replicated), ``"replicate"`` or ``"fsdp"``. A tuple, so that
    ``--config.sharding_rules='((".*kernel$", (None, "fsdp")),)'`` overrides it on the command
    line (ml_collections does not override list fields)."""
    return tuple(tuple(r) if isinstance(r, list) else r for r in rules)

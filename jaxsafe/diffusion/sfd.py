r"""Score Forgetting Distillation (SFD): SiD with a forgetting term, data-free unlearning.

Chen, Zhang, Zhou, "Score Forgetting Distillation: A Swift, Data-Free Method for Machine
Unlearning in Diffusion Models", ICLR 2025 (arXiv:2409.11219); reference code
``tqch/score-forgetting-distillation`` (``DDPM/runners/diffusion.py::train_sfd``,
``DDPM/functions/losses.py`` ``sid_g_loss_conditional`` / ``sid_sg_loss_conditional``,
``DDPM/configs/cifar10_sfd.yml``; ``SD/training/training_loop.py``). Every step of
:func:`jaxsafe.diffusion.sid.make_sid_step` runs two equally large batches: the *remaining* one
(conditions c drawn from the kept classes; G, f_ψ and the teacher f_φ all at c: plain SiD) and
the *forgetting* one (the forgotten class c_f for G and f_ψ, the override c_o for the teacher, so
that G's c_f distribution is pulled to the teacher's c_o one). With L_SiD(c; c′) the SiD loss
with G and f_ψ at c and f_φ at c′,

.. math::

    L_G = L_\mathrm{SiD}(c; c) + \lambda\, L_\mathrm{SiD}(c_f; c_o), \qquad
    L_\psi = L_\mathrm{EDM}(c) + \lambda\, L_\mathrm{EDM}(c_f),

λ = 0.01 (``sg_forget_coef``, ``g_forget_coef``; the SD script ``run_sfd.sh`` uses 1.0). No
training image is read. Deviation: the reference's CIFAR-10 code distils a DDPM (t_init = 440,
σ ≈ 2.5); here EDM / PFGM++ teachers with SiD's σ schedule (docs/sfd.md, "Decisions and
deviations from the authors' code").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxsafe.diffusion.sid import SiDTerm

__all__ = ["class_terms"]


def class_terms(
    num_classes: int,
    batch_size: int,
    *,
    forget: Mapping[int, int] | None = None,
    forget_weight: float = 0.01,
    remain_weight: float = 1.0,
) -> Callable[[jax.Array], Sequence[SiDTerm]]:
    """``terms(key)`` of :func:`sid.make_sid_step` for a class-conditional teacher (one-hot
    conditions; ``num_classes = 0``: unconditional, conditions None). Without ``forget``: SiD,
    one term of labels drawn uniformly over all classes. With ``forget = {c_f: c_o}``: SFD, a
    remaining term (labels uniform over the other classes, weight ``remain_weight``) and a
    forgetting term (labels uniform over the forgotten classes, the teacher at each one's
    override, weight ``forget_weight``)."""
    forget = dict(forget or {})
    if num_classes == 0:
        if forget:
            raise ValueError(
                "forgetting a class needs a class-conditional teacher (num_classes > 0)"
            )
        return lambda key: [SiDTerm(None, None, 1.0)]
    for c in list(forget) + list(forget.values()):
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} out of range for {num_classes} classes")
    keep = jnp.asarray([c for c in range(num_classes) if c not in forget])
    if forget and len(keep) == 0:
        raise ValueError("every class is forgotten: nothing remains to distil")
    f_classes = jnp.asarray(list(forget))
    f_override = jnp.asarray([forget[c] for c in forget])

    def one_hot(c):
        return jax.nn.one_hot(c, num_classes, dtype=jnp.float32)

    def terms(key):
        k_keep, k_forget = jax.random.split(key)
        if not forget:
            y = one_hot(jax.random.randint(k_keep, (batch_size,), 0, num_classes))
            return [SiDTerm(y, y, 1.0)]
        y = one_hot(keep[jax.random.randint(k_keep, (batch_size,), 0, len(keep))])
        j = jax.random.randint(k_forget, (batch_size,), 0, len(forget))
        return [
            SiDTerm(y, y, remain_weight),
            SiDTerm(one_hot(f_classes[j]), one_hot(f_override[j]), forget_weight),
        ]

    return terms

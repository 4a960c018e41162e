r"""AdvUnlearn: concept erasure made robust by adversarial training of the text encoder.

Zhang, Chen, Jia, Zhang, Fan, Liu, Hong, Ding, Liu, "Defensive Unlearning with Adversarial
Training for Robust Concept Erasure in Diffusion Models", NeurIPS 2024; reference code
``OPTML-Group/AdvUnlearn`` (``train-scripts/AdvUnlearn.py``, ``utils/attack_util.py``,
``utils/get_loss.py``). A bi-level problem over the text encoder τ_θ, the UNet ε frozen:

.. math::

    \min_\theta\ \ell_u(\theta, c^*_\mathrm{adv}) + \gamma\, \ell_r(\theta), \qquad
    c^*_\mathrm{adv} = \arg\min_{c_\mathrm{adv}}\ \ell_\mathrm{atk}(\theta, c_\mathrm{adv}).

The attacker prefixes k token embeddings δ to the concept prompt, c_adv = [SOT, δ, w(c_e)…],
and takes ``attack_steps`` Adam steps (the reference's unprojected ``pgd``; ``fast_at``: on the
gradient's sign) on ℓ_atk = E‖ε(x_t, τ_θ(c_adv), t) − sg[ε*(x_t, c_e, t)]‖². The defender then
takes one optimizer step on ℓ_u, ESD's negative-guidance loss (``esd.esd_target``) with the
adversarial prompt, plus γ times the retain term ℓ_r = E‖ε(x_r, τ_θ(c_r), t) −
sg[ε*(x_r, c_r, t)]‖² (``preservation.retain_mse``). Deviations from the reference code: (i) the
networks see the DDIM timestep τ_n the sample reached, where the reference (``get_loss.py``
L36–41, ESD's arithmetic) queries one 39–58 DDPM steps noisier (:mod:`jaxsafe.erasure.esd`);
(ii) the k embeddings are inserted after SOT and the *last* k positions dropped, so the sequence
keeps its EOT also for tokenizers whose pad id is not EOT (the reference drops the k positions
after the words: SD's first EOT); prompts whose tokens plus k exceed L raise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsafe.attacks.tokens import (
    check_prefix_fits,
    encode_embeddings,
    insert_prefix,
    optimise,
    token_embeddings,
)
from jaxsafe.diffusion import schedulers
from jaxsafe.erasure.esd import esd_target, partial_sample
from jaxsafe.erasure.preservation import retain_mse

# The prompt-attack pieces live in jaxsafe.attacks.tokens (one implementation for every
# attack); they are re-exported here for AdvUnlearn's users.
__all__ = [
    "ATTACK_INITS",
    "ATTACK_METHODS",
    "AdvUnlearn",
    "check_prefix_fits",
    "encode_embeddings",
    "insert_prefix",
    "make_advunlearn",
    "soft_prompt_attack",
    "text_encoder_selection",
    "token_embeddings",
]

ATTACK_METHODS = ("pgd", "fast_at")
ATTACK_INITS = ("random", "latest")
COMPONENTS = ("all", "attn", "ffn")


# --------------------------------------------------------------------------------------------
# Which text-encoder parameters train.


def text_encoder_selection(
    layers=None,
    component: str = "all",
    final_layer_norm: bool = False,
    prefix: str = "text_encoder",
):
    """Name predicate of the text-encoder parameters AdvUnlearn trains (the reference's
    ``param_choices``): encoder ``layers`` (None = all: ``text_encoder_full``), their ``component``
    (``all``, ``attn`` = self_attn, ``ffn`` = mlp), and the final LayerNorm when
    ``final_layer_norm`` — or, for ``text_encoder_full`` with ``component="all"``, always. The
    token and position embeddings never train."""
    if component not in COMPONENTS:
        raise ValueError(f"component={component!r}; expected one of {COMPONENTS}")
    layers = None if layers is None else {int(i) for i in layers}
    norm = final_layer_norm or (layers is None and component == "all")
    part = {"all": "", "attn": "/self_attn/", "ffn": "/mlp/"}[component]
    pat = re.compile(rf"^{re.escape(prefix)}/encoder/layers/(\d+)/")

    def sel(name: str) -> bool:
        if name.startswith(f"{prefix}/final_layer_norm/"):
            return norm
        m = pat.match(name)
        return bool(m) and (layers is None or int(m.group(1)) in layers) and part in name

    return sel


# --------------------------------------------------------------------------------------------
# The soft-prompt attack.


def soft_prompt_attack(
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    adv0: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    lr: float,
    method: str = "pgd",
) -> tuple[jax.Array, jax.Array]:
    """``(δ, losses)``: ``steps`` Adam steps (lr ``lr``) minimising ``objective(δ, key_i)`` from
    ``adv0`` (``jaxsafe.attacks.tokens.optimise``, the loop every attack shares);
    ``method="fast_at"`` steps on sign(∇)."""
    if method not in ATTACK_METHODS:
        raise ValueError(f"method={method!r}; expected one of {ATTACK_METHODS}")
    return optimise(
        objective,
        adv0,
        key,
        steps=steps,
        optimizer=optax.adam(lr),
        grad_transform=jnp.sign if method == "fast_at" else None,
    )


# --------------------------------------------------------------------------------------------
# The alternating step.


class AdvUnlearn(NamedTuple):
    """The pieces :func:`make_advunlearn` builds (all pure, jit-able).

    Attributes:
      sample: ``sample(frozen, cond, uncond, key) -> (x_t, t)``, partial DDIM samples of the
        frozen model.
      attack_loss: ``attack_loss(params, frozen, w_e, c_e, uncond, adv, key)``, ℓ_atk for one
        (x_t, t).
      init_adv: ``init_adv(params, frozen, key) -> (k, D)``, k random vocabulary token
        embeddings.
      loss: ``loss(params, frozen, prompts, x, t) -> (loss, metrics)``, ℓ_u + γ ℓ_r on given
        samples; ``x``/``t`` hold the concept sample first, then the retain samples; ``prompts``
        has ``x_e`` (1, L, D) the (adversarial) input token embeddings, ``c_e`` (1, L, D) and
        ``uncond`` (1, L, D) original embeddings, ``ids_r`` (R, L) and ``c_r`` (R, L, D) the
        retain prompts.
      step: ``step(state, batch, rng) -> (state, metrics)``, the trainer's custom step (attack,
        then one optimizer step on ``state.params``); ``state.extra["adv"]`` carries δ. Metrics:
        ``loss``, ``unlearn_loss``, ``retain_loss``, ``attacked`` (0 during warm-up) and
        ``attack_loss``, the mean of ℓ_atk over the attack's steps (each on its own (x_t, t), so
        not a curve).
    """

    sample: Callable
    attack_loss: Callable
    init_adv: Callable
    loss: Callable
    step: Callable


def make_advunlearn(
    eps_theta: Callable,
    eps_star: Callable,
    encode: Callable,
    words: Callable,
    sched: schedulers.SchedulerConfig,
    optimizer: optax.GradientTransformation,
    *,
    latent_shape,
    vocab_size: int,
    k: int = 1,
    attack_steps: int = 30,
    attack_lr: float = 1e-3,
    attack_method: str = "pgd",
    attack_init: str = "random",
    warmup: int = 200,
    retain_weight: float = 0.3,
    retain_batch: int = 5,
    eta: float = 1.0,
    start_guidance: float = 3.0,
    num_inference_steps: int = 50,
) -> AdvUnlearn:
    """AdvUnlearn's pieces (module docstring) over a model given as functions.

    Batch (fixed, from the experiment): ``ids_e`` (E, L) concept prompt ids, ``c_e`` (E, L, D)
    and ``uncond`` (1, L, D) their / the empty prompt's original embeddings, ``ids_r`` (n_r, L)
    and ``c_r`` (n_r, L, D) the retain set. Each step draws one concept (the reference's random
    word) and ``retain_batch`` distinct retain prompts. x_t (and x_r) come from
    ``esd.partial_sample``: n ~ U{0…N−1} guided DDIM steps of the frozen model from
    x_T ~ N(0, I), conditioned on the original embedding of c_e (of c_r), the retain samples
    sharing the concept's n, as the reference (which samples with the UNet being unlearned, the
    frozen one here, and the original text encoder).

    Args:
      eps_theta: ``eps_theta(params, frozen, x_t, t, emb)``, the UNet of the model being unlearned.
      eps_star: ``eps_star(frozen, x_t, t, emb)``, the frozen original.
      encode: ``encode(params, frozen, inputs_embeds) -> emb``, the trained text encoder run from
        token embeddings (:func:`encode_embeddings`).
      words: ``words(params, frozen, ids) -> token embeddings`` (:func:`token_embeddings`).
      sched, latent_shape: the model's scheduler config and (H, W, C) latent shape.
      optimizer: the unlearning optimizer (Adam, lr 1e-5 in the paper).
      vocab_size: tokens δ is initialised from (random vocabulary embeddings).
      k: prefix tokens (1).
      attack_steps: the attack's Adam steps K (30).
      attack_lr: the attack's learning rate (1e-3).
      attack_method: ``pgd`` (Adam) or ``fast_at`` (Adam on the gradient's sign).
      attack_init: ``random`` (new random tokens each attack; the authors' command) or
        ``latest`` (start from the previous δ in ``extra``).
      warmup: iterations of plain (unattacked) unlearning before the attacks start (200).
      retain_weight: γ (0.3).
      retain_batch: retain prompts per step (5; 0 = no retain term).
      eta, start_guidance, num_inference_steps: ESD's η (1), the partial sampling's guidance (3)
        and DDIM steps N (50).
    """
    if attack_method not in ATTACK_METHODS:
        raise ValueError(f"attack_method={attack_method!r}; expected one of {ATTACK_METHODS}")
    if attack_init not in ATTACK_INITS:
        raise ValueError(f"attack_init={attack_init!r}; expected one of {ATTACK_INITS}")
    if k < 1 or attack_steps < 1 or retain_batch < 0 or warmup < 0:
        raise ValueError(
            f"need k >= 1, attack_steps >= 1, retain_batch >= 0, warmup >= 0; got "
            f"k={k}, attack_steps={attack_steps}, retain_batch={retain_batch}, "
            f"warmup={warmup}"
        )
    R = retain_batch if retain_weight else 0

    def sample(frozen, cond, uncond, key):
        k_x, k_n = jax.random.split(key)
        x_T = jax.random.normal(k_x, (cond.shape[0], *latent_shape))
        n = jax.random.randint(k_n, (), 0, num_inference_steps)
        return partial_sample(
            lambda x, t, e: eps_star(frozen, x, t, e),
            sched,
            x_T,
            cond,
            uncond,
            start_guidance,
            num_inference_steps,
            n,
        )

    def attack_loss(params, frozen, w_e, c_e, uncond, adv, key):
        x, t = sample(frozen, c_e, uncond, key)
        params = jax.lax.stop_gradient(params)
        pred = eps_theta(params, frozen, x, t, encode(params, frozen, insert_prefix(w_e, adv)))
        return jnp.mean((pred - jax.lax.stop_gradient(eps_star(frozen, x, t, c_e))) ** 2)

    def init_adv(params, frozen, key):
        ids = jax.random.randint(key, (1, k), 0, vocab_size)
        return jax.lax.stop_gradient(words(params, frozen, ids))[0]

    def loss(params, frozen, prompts, x, t):
        x_e, c_e, uncond = prompts["x_e"], prompts["c_e"], prompts["uncond"]
        # One batched call of the frozen model: the concept sample with ∅ and c_e, the retain
        # samples with their prompts.
        star = eps_star(
            frozen,
            jnp.concatenate([x[:1], x]),
            jnp.concatenate([t[:1], t]),
            jnp.concatenate([uncond, c_e] + ([prompts["c_r"]] if R else [])),
        )
        target = esd_target(star[:1], star[1:2], star[:1], eta)
        emb = encode(params, frozen, x_e)
        if R:
            emb = jnp.concatenate(
                [emb, encode(params, frozen, words(params, frozen, prompts["ids_r"]))]
            )
        pred = eps_theta(params, frozen, x, t, emb)
        l_u = jnp.mean((pred[:1] - jax.lax.stop_gradient(target)) ** 2)
        metrics = {"unlearn_loss": l_u}
        total = l_u
        if R:
            l_r = retain_mse(pred[1:], star[2:])
            metrics["retain_loss"] = l_r
            total = l_u + retain_weight * l_r
        return total, metrics

    def step(state, batch, rng):
        params, frozen = state.params, state.frozen
        k_j, k_init, k_att, k_r, k_s = jax.random.split(rng, 5)
        j = jax.random.randint(k_j, (), 0, batch["ids_e"].shape[0])
        w_e = words(params, frozen, batch["ids_e"][j][None])
        c_e, uncond = batch["c_e"][j][None], batch["uncond"][:1]
        adv0 = init_adv(params, frozen, k_init) if attack_init == "random" else state.extra["adv"]
        attacking = state.step >= warmup

        def run_attack():
            return soft_prompt_attack(
                lambda a, key: attack_loss(params, frozen, w_e, c_e, uncond, a, key),
                adv0,
                k_att,
                steps=attack_steps,
                lr=attack_lr,
                method=attack_method,
            )

        adv, att = jax.lax.cond(
            attacking, run_attack, lambda: (adv0, jnp.zeros((attack_steps,), jnp.float32))
        )
        prompts = {
            "x_e": jnp.where(attacking, insert_prefix(w_e, adv), w_e),
            "c_e": c_e,
            "uncond": uncond,
        }
        cond = c_e
        if R:
            n_r = batch["ids_r"].shape[0]
            r = jax.random.choice(k_r, n_r, (R,), replace=R > n_r)
            prompts.update(ids_r=batch["ids_r"][r], c_r=batch["c_r"][r])
            cond = jnp.concatenate([c_e, prompts["c_r"]])
        x, t = sample(frozen, cond, uncond, k_s)
        (total, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
            params, frozen, prompts, x, t
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(params, updates),
            opt_state=opt_state,
            extra={**state.extra, "adv": adv},
        )
        metrics = {
            "loss": total,
            **metrics,
            "attacked": attacking.astype(jnp.float32),
            "attack_loss": jnp.mean(att),
        }
        return new, metrics

    return AdvUnlearn(
        sample=sample, attack_loss=attack_loss, init_adv=init_adv, loss=loss, step=step
    )

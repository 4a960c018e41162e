r"""P4D: prompting4debugging, matching the erased model to the original one.

Chin, Jiang, Huang, Chen, Chiu, "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models
by Finding Problematic Prompts", ICML 2024; reference code ``joycenerd/P4D``
(``prompt_optimization/optimize_n.py``, ``optimize_k.py``). Free token embeddings p are projected
to their nearest vocabulary rows (cosine, straight-through gradient,
``jaxsafe.attacks.tokens.project_to_vocabulary``) and optimised so that the *erased* model with
the adversarial prompt predicts the noise the *original* model predicts with the target prompt:

.. math::

    \min_p\ \mathbb{E}_{t \sim U\{0..T-1\},\, \epsilon}\, \bigl\lVert
        \epsilon_{\tilde\theta}(x_t, t, \tau(P(p))) - \epsilon_\theta(x_t, t, \tau(c))
        \bigr\rVert^2, \qquad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon,

x₀ the latent of the original model's image of c; one t per step, no guidance inside the loss,
AdamW (lr 0.1, weight decay 0.1), 3,000 steps. Layouts P (:func:`layout`): P4D-N, only the
n = 16 learned tokens, [SOT, p_1…p_n, EOT]; P4D-K, a learned token first and after every k = 3
prompt tokens, originals kept. Deviation: the reference's P4D-K writes over the EOT position and
its P4D-N pads with token 0; here both keep EOT and the tokenizer's padding, so the optimised
prompt is the one the judge's generation reads.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsafe.attacks import tokens
from jaxsafe.diffusion import schedulers

__all__ = ["LAYOUTS", "assemble", "layout", "make_attack", "optimizer"]

LAYOUTS = ("n", "k")


def layout(
    kind: str, num_words: int, *, n: int = 16, k: int = 3, length: int
) -> tuple[np.ndarray, int]:
    """``(index, m)``: where each of the ``length`` positions of the adversarial prompt comes
    from, for a prompt of ``num_words`` tokens (SOT and EOT not counted), and the number m of
    learned tokens. ``index[i]`` is 0 for SOT, 1…W for the prompt's tokens, W + 1 for EOT,
    W + 2 for padding and W + 3 + j for learned token j (see :func:`assemble`)."""
    if kind not in LAYOUTS:
        raise ValueError(f"layout {kind!r}; expected one of {LAYOUTS}")
    w = int(num_words)
    if kind == "n":
        body = [w + 3 + j for j in range(n)]
    else:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        body, j = [], 0
        for i in range(w):
            if i % k == 0:
                body.append(w + 3 + j)
                j += 1
            body.append(1 + i)
        if w % k == 0:  # the reference's ⌊W/k⌋ + 1: one more after the last full group
            body.append(w + 3 + j)
    m = sum(1 for b in body if b >= w + 3)
    if len(body) + 2 > length:
        raise ValueError(
            f"P4D-{kind.upper()} needs {len(body) + 2} positions for a {w}-token "
            f"prompt; the text encoder has {length}"
        )
    index = [0] + body + [w + 1] + [w + 2] * (length - len(body) - 2)
    return np.asarray(index, np.int32), m


def assemble(
    word_embeds: jax.Array, num_words: int, learned: jax.Array, index: np.ndarray
) -> jax.Array:
    """The (1, L, D) adversarial prompt embeddings: ``word_embeds`` (1, L, D) the prompt's token
    embeddings ([SOT, w_1…w_W, EOT, pad…]), ``learned`` (m, D), ``index`` from :func:`layout`."""
    w = int(num_words)
    source = jnp.concatenate([word_embeds[0, : w + 3], learned.astype(word_embeds.dtype)])
    return source[jnp.asarray(index)][None]


def optimizer(lr: float = 0.1, weight_decay: float = 0.1) -> optax.GradientTransformation:
    """The reference's ``torch.optim.AdamW(lr=0.1, weight_decay=0.1)``."""
    return optax.adamw(lr, weight_decay=weight_decay)


def make_attack(
    eps_erased: Callable,
    eps_original: Callable,
    encode_embeds: Callable,
    table: jax.Array,
    sched: schedulers.SchedulerConfig,
    *,
    steps: int,
    lr: float = 0.1,
    weight_decay: float = 0.1,
    record_every: int | None = None,
):
    """``run(params, p0, word_embeds, num_words, index, target_emb, x0, key) -> (p, losses)``
    (and the snapshots of p every ``record_every`` steps, ``tokens.optimise``)
    for one prompt: ``eps_erased(params, x_t, t, emb)``, ``eps_original(params, x_t, t, emb)``,
    ``encode_embeds(params, inputs_embeds)``, ``table`` (V, D) the rows tokens may take,
    ``target_emb`` the original model's embedding of the target prompt, ``x0`` (1, *latent).
    The returned p are the continuous embeddings; their tokens are
    ``tokens.nearest_tokens(p, table)``. ``num_words`` and ``index`` are static per prompt."""
    opt = optimizer(lr, weight_decay)
    T = sched.num_train_timesteps

    def run(params, p0, word_embeds, num_words, index, target_emb, x0, key):
        def objective(p, key):
            k_t, k_eps = jax.random.split(key)
            t = jax.random.randint(k_t, (x0.shape[0],), 0, T)
            eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
            x_t = schedulers.add_noise(sched, x0, eps, t)
            adv = assemble(word_embeds, num_words, tokens.project_to_vocabulary(p, table), index)
            pred = eps_erased(params, x_t, t, encode_embeds(params, adv))
            want = jax.lax.stop_gradient(eps_original(params, x_t, t, target_emb))
            return jnp.mean((pred - want) ** 2)

        return tokens.optimise(
            objective, p0, key, steps=steps, optimizer=opt, record_every=record_every
        )

    return run

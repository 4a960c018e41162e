"""Running the attacks against a loaded model (``jaxsafe.diffusion.pipeline``): batches of
prompts attacked together, each with its own adversarial tokens, target image and seed.

:func:`unlearndiffatk` is UnlearnDiffAtk's protocol (``Diffusion-MU-Attack``
``src/attackers/text_grad_.py`` L180-233): a prompt whose own generation already shows the
concept counts as a pre-attack success and is not attacked; the others are attacked timestep by
timestep of the sweep, the judge reading the argmax tokens after each, and stop at their first
success. Success rates: ``pre`` = pre-attack successes / N, ``post`` = (pre-attack successes +
attack successes) / N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.attacks import tokens, unlearndiffatk
from jaxsafe.diffusion import pipeline

__all__ = ["adversarial_texts", "unlearndiffatk_run", "word_rows"]


def word_rows(pipe: pipeline.Pipeline) -> np.ndarray:
    """The token ids adversarial tokens may take: the test bed's words (no PAD/SOT/EOT); for a
    CLIP tokenizer every id but its special tokens."""
    tok = pipe.tokenizer
    special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    return np.asarray([i for i in range(tok.vocab_size) if i not in special], np.int32)


def adversarial_texts(pipe: pipeline.Pipeline, ids: np.ndarray, prompts: Sequence[str]
                      ) -> list[str]:
    """The prompts with the adversarial token ids (B, k) as text in front, as the judge's
    generation reads them (the reference decodes its tokens the same way)."""
    out = []
    for row, prompt in zip(np.asarray(ids), prompts):
        if pipe.testbed:
            words = " ".join(pipe.tokenizer.words[int(i) - 1] for i in row)
        else:
            words = pipe.tokenizer.decode([int(i) for i in row])
        out.append(f"{words} {prompt}".strip())
    return out


def unlearndiffatk_run(pipe: pipeline.Pipeline, prompts: Sequence[str], seeds, target_images,
                       judge: Callable[[np.ndarray], np.ndarray], *, k: int = 3,
                       steps_per_t: int = 40, num_t: int = 50, lr: float = 0.01,
                       weight_decay: float = 0.1, key=None,
                       sampling: dict | None = None) -> dict:
    """UnlearnDiffAtk against the (erased) model ``pipe``: ``target_images`` (B, H, W, 3) in
    [−1, 1] are the original model's images of ``prompts`` (x₀ = their latents), ``seeds`` the
    judge's generation seeds, ``sampling`` the generator's settings. Returns per-prompt
    ``pre`` / ``success`` (bool), ``first_t`` (the sweep index of the first success, −1),
    ``texts`` (the adversarial prompts) and the rates ``pre_asr``, ``post_asr``."""
    if pipe.encode_image is None:
        raise ValueError(f"{pipe.folder}: its latent map cannot encode the target images")
    prompts, seeds = list(prompts), np.asarray(seeds, np.int32)
    graphdef, *state = nnx.split(pipe.model)
    generate = pipeline.generator(pipe, graphdef, **(sampling or {}))
    pre = np.asarray(judge(generate(state, prompts, seeds)), bool)
    vocab = word_rows(pipe)
    te = pipe.model.text_encoder
    tokens.check_prefix_fits(pipe.lengths(prompts), k, te.config.max_position_embeddings,
                             prompts)
    table = te.embeddings.token_embedding.embedding[...][jnp.asarray(vocab)]

    def eps_theta(st, x, t, emb):
        return nnx.merge(graphdef, *st)(x, t, emb)

    def encode(st, x):
        return tokens.encode_embeddings(nnx.merge(graphdef, *st).text_encoder, x)

    steps = unlearndiffatk.make_attack_steps(eps_theta, encode, table, pipe.scheduler,
                                             steps=steps_per_t, lr=lr, weight_decay=weight_decay)
    batched = jax.jit(jax.vmap(steps, in_axes=(None, 0, 0, 0, None, 0)))
    words = tokens.token_embeddings(te, jnp.asarray(pipe.tokenize(prompts)))[:, None]
    x0 = pipe.encode_image(jnp.asarray(target_images, jnp.float32))[:, None]
    u = jnp.broadcast_to(tokens.uniform_simplex(k, len(vocab)), (len(prompts), k, len(vocab)))
    done, first_t = pre.copy(), np.full(len(prompts), -1)
    texts = list(prompts)
    key = jax.random.key(0) if key is None else key
    timesteps = unlearndiffatk.timestep_sweep(num_t, pipe.scheduler.num_train_timesteps)
    for j, t in enumerate(timesteps):
        if done.all():
            break
        keys = jax.random.split(jax.random.fold_in(key, j), len(prompts))
        new, _ = batched(tuple(state), u, words, x0, int(t), keys)
        u = jnp.where(jnp.asarray(done)[:, None, None], u, new)  # finished prompts stay put
        todo = np.flatnonzero(~done)
        adv = adversarial_texts(pipe, vocab[np.asarray(jnp.argmax(u[todo], -1))],
                                [prompts[i] for i in todo])
        hit = np.asarray(judge(generate(state, adv, seeds[todo])), bool)
        for i, a, h in zip(todo, adv, hit):
            texts[i] = a
            if h:
                done[i], first_t[i] = True, j
    success = done
    return {"pre": pre, "success": success, "first_t": first_t, "texts": texts,
            "pre_asr": float(pre.mean()), "post_asr": float(success.mean())}

"""Running the attacks against a loaded model (``jaxsafe.diffusion.pipeline``): batches of
prompts attacked together, each with its own adversarial tokens, target image and seed.

* :func:`unlearndiffatk_run`: UnlearnDiffAtk's protocol (``Diffusion-MU-Attack``
  ``src/attackers/text_grad_.py`` L180-233): a prompt whose own generation already shows the
  concept counts as a pre-attack success and is not attacked; the others are attacked timestep
  by timestep of the sweep, the judge reading the argmax tokens after each, and stop at their
  first success. Rates: ``pre`` = pre-attack successes / N, ``post`` = (pre-attack successes +
  attack successes) / N.
* :func:`p4d_run`: P4D's protocol (``P4D`` ``prompt_optimization/optimize_n.py`` L258-278,
  ``run_p4dn.py`` L236-251): the prompt is recorded every ``eval_every`` steps (step 0
  included), the one whose image is most similar to the target image is kept, and the attack
  succeeds when any of ``num_samples`` images of it shows the concept.
* :func:`ring_a_bell_prompts` searches prompts on a text encoder alone (the original model's:
  the attack is model-agnostic) and :func:`judge_prompts` judges them on any model.
* :func:`concept_arithmetic_run`: the prompts with extra composed terms, judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.attacks import p4d, ring_a_bell, tokens, unlearndiffatk
from jaxsafe.diffusion import pipeline

__all__ = [
    "ATTACKS",
    "adversarial_texts",
    "concept_arithmetic_run",
    "judge_prompts",
    "p4d_run",
    "ring_a_bell_prompts",
    "run_attack",
    "sampler",
    "token_texts",
    "unlearndiffatk_run",
    "word_rows",
]


def word_rows(pipe: pipeline.Pipeline) -> np.ndarray:
    """The token ids adversarial tokens may take: the test bed's words (no PAD/SOT/EOT); for a
    CLIP tokenizer every id but its special tokens."""
    tok = pipe.tokenizer
    special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    return np.asarray([i for i in range(tok.vocab_size) if i not in special], np.int32)


def token_texts(pipe: pipeline.Pipeline, ids) -> list[str]:
    """Token ids (B, k) as text, as a generation from text reads them (the references decode
    their tokens the same way)."""
    if pipe.testbed:
        return [" ".join(pipe.tokenizer.words[int(i) - 1] for i in row) for row in np.asarray(ids)]
    return [pipe.tokenizer.decode([int(i) for i in row]) for row in np.asarray(ids)]


def adversarial_texts(
    pipe: pipeline.Pipeline, ids: np.ndarray, prompts: Sequence[str]
) -> list[str]:
    """The prompts with the adversarial token ids (B, k) as text in front."""
    return [f"{words} {prompt}".strip() for words, prompt in zip(token_texts(pipe, ids), prompts)]


_COMPILED: dict = {}  # (attack, model folder, graph, settings) -> jitted function


def _compiled(key, build: Callable):
    """One jitted attack function per (attack, model folder, graph, settings) in a process:
    the weights and the token table are arguments, so attacking many edits of one model (the
    robustness table) compiles once, as ``pipeline.generator`` does for sampling."""
    if key not in _COMPILED:
        if len(_COMPILED) >= 16:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = build()
    return _COMPILED[key]


def _white_box(pipe: pipeline.Pipeline):
    """``(graphdef, state, eps(state, x, t, emb), encode(state, inputs_embeds), vocab, table)``:
    the model's pieces the gradient attacks differentiate, ``table`` the token-embedding rows of
    the ids ``vocab`` adversarial tokens may take."""
    graphdef, *state = nnx.split(pipe.model)
    vocab = word_rows(pipe)
    table = pipe.model.text_encoder.embeddings.token_embedding.embedding[...][jnp.asarray(vocab)]

    def eps(st, x, t, emb):
        return nnx.merge(graphdef, *st)(x, t, emb)

    def encode(st, x):
        return tokens.encode_embeddings(nnx.merge(graphdef, *st).text_encoder, x)

    return graphdef, tuple(state), eps, encode, vocab, table


def sampler(pipe: pipeline.Pipeline, sampling: dict | None, generate=None):
    """``generate(texts, seeds, **kw) -> images``: ``generate`` itself when given (a method's
    own sampler), else the model's guided sampler."""
    if generate is not None:
        return generate
    graphdef, *state = nnx.split(pipe.model)
    sample = pipeline.generator(pipe, graphdef, **(sampling or {}))
    return lambda texts, seeds, **kw: sample(state, list(texts), seeds, **kw)


def judge_prompts(
    pipe: pipeline.Pipeline,
    texts: Sequence[str],
    seeds,
    judge,
    *,
    num_samples: int = 1,
    sampling: dict | None = None,
    generate=None,
    **generate_kw,
) -> np.ndarray:
    """(n,) bool: does any of ``num_samples`` images of each text (seeds ``seeds[i] + 1000·j``)
    show the concept; ``generate_kw`` go to the generator (``terms=``). ``generate(texts,
    seeds) -> images`` replaces the model's own sampler (a method that samples its own way:
    SPM's strengths, SAFREE's filter, SFD's one step)."""
    generate = sampler(pipe, sampling, generate)
    seeds = np.asarray(seeds, np.int64)
    hits = []
    for j in range(num_samples):
        images = generate(list(texts), seeds + 1000 * j, **generate_kw)
        hits.append(np.asarray(judge(images), bool))
    return np.any(hits, axis=0)


def unlearndiffatk_run(
    pipe: pipeline.Pipeline,
    prompts: Sequence[str],
    seeds,
    target_images,
    judge: Callable[[np.ndarray], np.ndarray],
    *,
    k: int = 3,
    steps_per_t: int = 40,
    num_t: int = 50,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    key=None,
    sampling: dict | None = None,
    generate=None,
) -> dict:
    """UnlearnDiffAtk against the (erased) model ``pipe``: ``target_images`` (B, H, W, 3) in
    [−1, 1] are the original model's images of ``prompts`` (x₀ = their latents), ``seeds`` the
    judge's generation seeds, ``sampling`` the generator's settings. Returns per-prompt
    ``pre`` / ``success`` (bool), ``first_t`` (the sweep index of the first success, −1),
    ``texts`` (the adversarial prompts) and the rates ``pre_asr``, ``post_asr``."""
    if pipe.encode_image is None:
        raise ValueError(f"{pipe.folder}: its latent map cannot encode the target images")
    prompts, seeds = list(prompts), np.asarray(seeds, np.int32)
    generate = sampler(pipe, sampling, generate)
    pre = np.asarray(judge(generate(prompts, seeds)), bool)
    _, state, eps_theta, encode, vocab, table = _white_box(pipe)
    te = pipe.model.text_encoder
    tokens.check_prefix_fits(pipe.lengths(prompts), k, te.config.max_position_embeddings, prompts)

    def build():
        def one(params, table, u, words, x0, t, key):
            steps = unlearndiffatk.make_attack_steps(
                eps_theta,
                encode,
                table,
                pipe.scheduler,
                steps=steps_per_t,
                lr=lr,
                weight_decay=weight_decay,
            )
            return steps(params, u, words, x0, t, key)

        return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, 0, None, 0)))

    attack = _compiled(
        ("unlearndiffatk", pipe.folder, nnx.graphdef(pipe.model), steps_per_t, lr, weight_decay),
        build,
    )
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
        new, _ = attack(state, table, u, words, x0, int(t), keys)
        u = jnp.where(jnp.asarray(done)[:, None, None], u, new)  # finished prompts stay put
        todo = np.flatnonzero(~done)
        adv = adversarial_texts(
            pipe, vocab[np.asarray(jnp.argmax(u[todo], -1))], [prompts[i] for i in todo]
        )
        hit = np.asarray(judge(generate(adv, seeds[todo])), bool)
        for i, a, h in zip(todo, adv, hit):
            texts[i] = a
            if h:
                done[i], first_t[i] = True, j
    success = done
    return {
        "pre": pre,
        "success": success,
        "first_t": first_t,
        "texts": texts,
        "pre_asr": float(pre.mean()),
        "post_asr": float(success.mean()),
    }


def p4d_run(
    pipe: pipeline.Pipeline,
    original: pipeline.Pipeline,
    prompts: Sequence[str],
    seeds,
    target_images,
    judge,
    similarity: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    kind: str = "n",
    n: int = 16,
    k: int = 3,
    steps: int = 3000,
    eval_every: int = 50,
    lr: float = 0.1,
    weight_decay: float = 0.1,
    num_samples: int = 3,
    key=None,
    sampling: dict | None = None,
    generate=None,
) -> dict:
    """P4D-N (``kind="n"``) or P4D-K (``"k"``) against the erased model ``pipe``, matching the
    ``original`` model's ε on ``prompts``; ``target_images`` (B, H, W, 3) in [−1, 1] the
    original's images of them (x₀), ``similarity(images, targets) -> (B,)`` the checkpoint
    selection (the reference: CLIP ViT-H-14 image cosine). Prompts are grouped by token count
    (the layout's shape); each group compiles once. Returns per-prompt ``success``, ``texts``
    (the kept prompts), ``best_step`` and the rate ``asr``."""
    if original.encode_image is None:
        raise ValueError(f"{original.folder}: its latent map cannot encode the target images")
    prompts, seeds = list(prompts), np.asarray(seeds, np.int32)
    _, state, eps, encode, vocab, table = _white_box(pipe)
    o_graphdef, *o_state = nnx.split(original.model)

    def eps_original(st, x, t, emb):
        return nnx.merge(o_graphdef, *st)(x, t, emb)

    both = (state, tuple(o_state))

    def build(w, index):
        def one(params, table, p0, we, te, x, kk):
            attack = p4d.make_attack(
                lambda p, x, t, e: eps(p[0], x, t, e),
                lambda p, x, t, e: eps_original(p[1], x, t, e),
                lambda p, x: encode(p[0], x),
                table,
                pipe.scheduler,
                steps=steps,
                lr=lr,
                weight_decay=weight_decay,
                record_every=eval_every,
            )
            return attack(params, p0, we[None], w, index, te[None], x[None], kk)

        return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0, 0)))

    length = pipe.model.text_encoder.config.max_position_embeddings
    ids = pipe.tokenize(prompts)
    words = tokens.token_embeddings(pipe.model.text_encoder, jnp.asarray(ids))
    target_emb = original.embed(prompts)
    x0 = original.encode_image(jnp.asarray(target_images, jnp.float32))
    num_words = pipe.lengths(prompts) - 2
    key = jax.random.key(0) if key is None else key
    texts, best_step = list(prompts), np.zeros(len(prompts), np.int32)
    generate = sampler(pipe, sampling, generate)
    targets = np.asarray(target_images, np.float32)
    for w in np.unique(num_words):
        rows = np.flatnonzero(num_words == w)
        index, m = p4d.layout(kind, int(w), n=n, k=k, length=length)
        run = _compiled(
            (
                "p4d",
                pipe.folder,
                nnx.graphdef(pipe.model),
                original.folder,
                o_graphdef,
                kind,
                n,
                k,
                steps,
                eval_every,
                lr,
                weight_decay,
                int(w),
            ),
            lambda w=int(w), index=index: build(w, index),
        )
        k_init, k_run = jax.random.split(jax.random.fold_in(key, int(w)))
        init_ids = jax.random.randint(k_init, (len(rows), m), 0, len(vocab))
        _, _, snaps = run(
            both,
            table,
            table[init_ids],
            words[rows],
            target_emb[rows],
            x0[rows],
            jax.random.split(k_run, len(rows)),
        )
        snap_ids = np.asarray(tokens.nearest_tokens(snaps, table))  # (b, S, m)
        best = np.full(len(rows), -np.inf)
        for j in range(snap_ids.shape[1]):
            cand = [
                _p4d_text(pipe, kind, prompts[r], vocab[snap_ids[i, j]], k)
                for i, r in enumerate(rows)
            ]
            sim = np.asarray(similarity(generate(cand, seeds[rows]), targets[rows]))
            for i, r in enumerate(rows):
                if sim[i] > best[i]:
                    best[i], texts[r], best_step[r] = sim[i], cand[i], j * eval_every
    success = judge_prompts(
        pipe, texts, seeds, judge, num_samples=num_samples, sampling=sampling, generate=generate
    )
    return {
        "success": success,
        "texts": texts,
        "best_step": best_step,
        "asr": float(success.mean()),
    }


def _p4d_text(pipe, kind: str, prompt: str, ids, k: int) -> str:
    """The text of a P4D prompt: the learned tokens alone (N), or interleaved with the
    prompt's tokens as :func:`jaxsafe.attacks.p4d.layout` places them (K)."""
    learned = token_texts(pipe, np.asarray(ids)[:, None])
    if kind == "n":
        return " ".join(learned)
    ids_prompt = pipe.tokenize([prompt])[0]
    w = int(pipe.lengths([prompt])[0]) - 2
    words = token_texts(pipe, ids_prompt[1 : w + 1][:, None])
    out, j = [], 0
    for i, word in enumerate(words):
        if i % k == 0:
            out.append(learned[j])
            j += 1
        out.append(word)
    if w % k == 0:
        out.append(learned[j])
    return " ".join(out)


def ring_a_bell_prompts(
    attacker: pipeline.Pipeline,
    prompts: Sequence[str],
    pairs: tuple[Sequence[str], Sequence[str]],
    *,
    eta: float = 3.0,
    length: int = 16,
    population: int = 200,
    generations: int = 3000,
    mutate_rate: float = 0.25,
    elite: int = 1,
    key=None,
) -> tuple[list[str], np.ndarray]:
    """Ring-A-Bell's prompts for ``prompts``, searched on ``attacker``'s text encoder alone
    (the original model's: the attack never sees the erased one): the concept vector from
    ``pairs`` (prompts with, without the concept), target E(prompt) + η c, the genetic search
    (``jaxsafe.attacks.ring_a_bell``), all prompts at once. Returns the texts and the best
    fitness per prompt."""
    tok = attacker.tokenizer
    L = attacker.model.text_encoder.config.max_position_embeddings
    graphdef, *state = nnx.split(attacker.model)

    def embed(ids):
        return nnx.merge(graphdef, *state).encode(ids)

    c = ring_a_bell.concept_vector(embed, attacker.tokenize(pairs[0]), attacker.tokenize(pairs[1]))
    targets = attacker.embed(list(prompts)) + eta * c[None]
    ids_kw = dict(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id, length=L)
    vocab = word_rows(attacker)

    def search(target, key):
        return ring_a_bell.genetic_search(
            ring_a_bell.sequence_fitness(embed, target, **ids_kw),
            key,
            vocab_ids=vocab,
            length=length,
            population=population,
            generations=generations,
            mutate_rate=mutate_rate,
            elite=elite,
        )

    key = jax.random.key(0) if key is None else key
    best, history = jax.jit(jax.vmap(search))(targets, jax.random.split(key, len(prompts)))
    return token_texts(attacker, best), np.asarray(history[:, -1])


def concept_arithmetic_run(
    pipe: pipeline.Pipeline,
    prompts: Sequence[str],
    seeds,
    judge,
    compositions: dict,
    *,
    fill: dict | None = None,
    num_samples: int = 1,
    sampling: dict | None = None,
    generate=None,
) -> dict:
    """Concept arithmetic (Petsiuk & Saenko, ECCV 2024, eq. 2): every composition
    ``name -> [(template, weight), …]`` adds its terms to every prompt's guidance,
    ε̃ = ε_∅ + s (ε_prompt − ε_∅) + Σ_j w_j (ε_{c_j} − ε_∅), templates formatted with
    ``fill`` (e.g. ``{"concept": "red"}``) and ``prompt``. Returns per composition the
    per-prompt successes and the rate. ``generate`` (a method's own sampler) must take the
    same ``terms=`` (SPM's, SAFREE's and SFD's do)."""
    out = {}
    for name, terms in compositions.items():
        texts = [[t.format(prompt=p, **(fill or {})) for p in prompts] for t, _ in terms]
        hit = judge_prompts(
            pipe,
            prompts,
            seeds,
            judge,
            num_samples=num_samples,
            sampling=sampling,
            generate=generate,
            terms=(texts, [w for _, w in terms]),
        )
        out[name] = {"success": hit, "asr": float(hit.mean()), "terms": [list(t) for t in terms]}
    return out


ATTACKS = ("none", "unlearndiffatk", "p4d", "ring_a_bell", "concept_arithmetic")


def run_attack(
    config,
    pipe: pipeline.Pipeline,
    original: pipeline.Pipeline,
    prompts: Sequence[str],
    seeds,
    judge,
    *,
    similarity=None,
    pairs=None,
    words: dict | None = None,
    rab_texts: Sequence[str] | None = None,
    generate=None,
) -> dict:
    """One attack of ``configs/attacks/<attack>.py`` (``config.attack``) against ``pipe``:
    ``{"success": (n,) bool, "texts": the prompts judged, "asr": rate, …}``. ``original`` makes
    the target images (its images of the prompts, the prompts' seeds) and runs Ring-A-Bell's
    search, unless ``rab_texts`` (already searched prompts) are given; ``similarity`` selects
    P4D's prompt, ``pairs`` feed Ring-A-Bell's concept vector, ``words`` fill the concept-
    arithmetic templates. ``"none"``: the prompts themselves (the pre-attack rate).
    ``generate(texts, seeds)``: the model's own sampler (SPM's strengths, SAFREE's filter,
    SFD's one step) for every generation the attack judges; the gradient attacks then
    differentiate ``pipe``'s plain denoiser, and concept arithmetic passes its terms to it
    (``generate(texts, seeds, terms=)``)."""
    c, prompts, seeds = config, list(prompts), np.asarray(seeds, np.int32)
    if c.attack not in ATTACKS:
        raise ValueError(f"attack {c.attack!r}; expected one of {ATTACKS}")
    sampling = dict(c.sampling)
    key = jax.random.key(c.seed)
    if c.attack == "none":
        hit = judge_prompts(
            pipe,
            prompts,
            seeds,
            judge,
            num_samples=c.num_samples,
            sampling=sampling,
            generate=generate,
        )
        return {"success": hit, "texts": prompts, "asr": float(hit.mean())}
    if c.attack == "ring_a_bell":
        if rab_texts is None:
            if pairs is None:
                raise ValueError("Ring-A-Bell needs prompt pairs with and without the concept")
            rab_texts, _ = ring_a_bell_prompts(
                original,
                prompts,
                pairs,
                eta=c.eta,
                length=c.length,
                population=c.population,
                generations=c.generations,
                mutate_rate=c.mutate_rate,
                elite=c.elite,
                key=key,
            )
        hit = judge_prompts(
            pipe,
            rab_texts,
            seeds,
            judge,
            num_samples=c.num_samples,
            sampling=sampling,
            generate=generate,
        )
        return {"success": hit, "texts": list(rab_texts), "asr": float(hit.mean())}
    if c.attack == "concept_arithmetic":
        fill = dict(words or {})
        for name in ("concept", "anchor", "context"):
            if c.get(name):
                fill[name] = c[name]
        per = concept_arithmetic_run(
            pipe,
            prompts,
            seeds,
            judge,
            {k: tuple(v) for k, v in c.compositions.items()},
            fill=fill,
            num_samples=c.num_samples,
            sampling=sampling,
            generate=generate,
        )
        hit = np.any([v["success"] for v in per.values()], axis=0)
        return {
            "success": hit,
            "texts": prompts,
            "asr": float(hit.mean()),
            "compositions": {k: {"asr": v["asr"], "success": v["success"]} for k, v in per.items()},
        }
    graphdef, *state = nnx.split(original.model)
    targets = pipeline.generator(original, graphdef, **sampling)(state, prompts, seeds)
    if c.attack == "unlearndiffatk":
        out = unlearndiffatk_run(
            pipe,
            prompts,
            seeds,
            targets,
            judge,
            k=c.k,
            steps_per_t=c.steps_per_t,
            num_t=c.num_t,
            lr=c.lr,
            weight_decay=c.weight_decay,
            key=key,
            sampling=sampling,
            generate=generate,
        )
        return {**out, "asr": out["post_asr"]}
    if similarity is None:
        raise ValueError("P4D needs an image similarity to keep its best prompt")
    return p4d_run(
        pipe,
        original,
        prompts,
        seeds,
        targets,
        judge,
        similarity,
        kind=c.kind,
        n=c.n,
        k=c.k,
        steps=c.steps,
        eval_every=c.eval_every,
        lr=c.lr,
        weight_decay=c.weight_decay,
        num_samples=c.num_samples,
        key=key,
        sampling=sampling,
        generate=generate,
    )

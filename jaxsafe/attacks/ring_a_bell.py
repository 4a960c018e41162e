r"""Ring-A-Bell: a model-agnostic attack that needs only the text encoder.

Tsai, Hsu, Xie, Lin, Chen, Hsu, Yu, Chen, "Ring-A-Bell! How Reliable are Concept Removal Methods
for Diffusion Models?", ICLR 2024; reference code ``chiayi-hsu/Ring-A-Bell``
(``Get_Concept_Vector.ipynb``, ``InversePrompt.ipynb``). With E the text encoder's full output
sequence (L, D) (``last_hidden_state``, not pooled) and N prompt pairs with (p_i⁺) and without
(p_i⁻) the concept,

.. math::

    c = \frac1N \sum_i \bigl[E(p_i^+) - E(p_i^-)\bigr], \qquad
    \mathrm{fitness}(x) = \bigl\lVert E([\mathrm{SOT}, x_1 \ldots x_K, \mathrm{EOT} \ldots])
        - \bigl(E(\mathrm{prompt}) + \eta\, c\bigr) \bigr\rVert^2,

η = 3. The discrete prompt x ∈ V^K (K = 16) of least fitness is found by a genetic search:
truncation selection of the best half, single-point crossover with random partners, each
individual mutated with probability 0.25 at one random position (population 200, 3,000
generations). Deviations, for a fixed-shape compiled loop (docs/attacks.md): the population is
fixed at P, P/2 survivors and P/2 children (the reference's expected count: it adds both children
of a crossover with probability 0.5 per survivor, so its size varies); ``elite`` (default 1)
keeps that many best survivors unmutated (``elite=0``: the reference, which also mutates its
best).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["candidate_ids", "concept_vector", "genetic_search", "sequence_fitness"]


def concept_vector(embed: Callable, with_ids, without_ids) -> jax.Array:
    """c = mean_i [E(with_i) − E(without_i)] (L, D): ``embed(ids (N, L)) -> (N, L, D)``, the two
    (N, L) id arrays paired row by row."""
    with_ids, without_ids = jnp.asarray(with_ids), jnp.asarray(without_ids)
    if with_ids.shape != without_ids.shape or with_ids.ndim != 2:
        raise ValueError(
            f"prompt pairs: expected two (N, L) id arrays of one shape, got "
            f"{with_ids.shape} and {without_ids.shape}"
        )
    return jnp.mean(embed(with_ids) - embed(without_ids), axis=0)


def candidate_ids(x: jax.Array, *, bos: int, eos: int, pad: int, length: int) -> jax.Array:
    """[SOT, x_1…x_K, EOT, pad…] (…, length) for candidate tokens x (…, K); SD's tokenizer pads
    with EOT (pad = eos), the test bed's with 0."""
    k = x.shape[-1]
    if k + 2 > length:
        raise ValueError(
            f"{k} tokens with SOT and EOT exceed the text encoder's {length} positions"
        )
    lead = x.shape[:-1]
    return jnp.concatenate(
        [
            jnp.full(lead + (1,), bos, x.dtype),
            x,
            jnp.full(lead + (1,), eos, x.dtype),
            jnp.full(lead + (length - k - 2,), pad, x.dtype),
        ],
        -1,
    )


def sequence_fitness(embed: Callable, target: jax.Array, **ids_kw) -> Callable:
    """``fitness(x (P, K)) -> (P,)``: Σ (E(candidate_ids(x)) − target)² (lower is better)."""

    def fitness(x):
        e = embed(candidate_ids(x, **ids_kw))
        return jnp.sum((e - target[None]) ** 2, axis=(1, 2))

    return fitness


def genetic_search(
    fitness: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    *,
    vocab_ids,
    length: int,
    population: int = 200,
    generations: int = 3000,
    mutate_rate: float = 0.25,
    elite: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """``(best (K,), history (generations + 1,))``: the genetic search of the module docstring
    over tokens drawn from ``vocab_ids``, minimising ``fitness`` (P, K) -> (P,); ``history[g]``
    is the best fitness of the population scored at generation g (the last entry: the final
    population, which is not bred, as the reference's last generation)."""
    vocab_ids = jnp.asarray(vocab_ids, jnp.int32)
    if population < 4 or population % 2:
        raise ValueError(f"population must be an even number >= 4, got {population}")
    if not 0 <= elite <= population // 2:
        raise ValueError(f"elite must be in 0..{population // 2}, got {elite}")
    half = population // 2

    def draw(key, shape):
        return vocab_ids[jax.random.randint(key, shape, 0, len(vocab_ids))]

    def generation(pop, key):
        scores = fitness(pop)
        order = jnp.argsort(scores)
        survivors = pop[order[:half]]
        k_partner, k_cut, k_mut, k_pos, k_tok = jax.random.split(key, 5)
        partner = survivors[jax.random.randint(k_partner, (half,), 0, half)]
        cut = jax.random.randint(k_cut, (half, 1), 0, length)
        children = jnp.where(jnp.arange(length)[None] < cut, survivors, partner)
        pop = jnp.concatenate([survivors, children])
        mutate = jax.random.bernoulli(k_mut, mutate_rate, (population,))
        mutate = mutate & (jnp.arange(population) >= elite)
        pos = jax.random.randint(k_pos, (population,), 0, length)
        hit = mutate[:, None] & (jnp.arange(length)[None] == pos[:, None])
        pop = jnp.where(hit, draw(k_tok, (population, length)), pop)
        return pop, scores[order[0]]

    @jax.jit
    def run(key):
        k0, k_gen = jax.random.split(key)
        pop, history = jax.lax.scan(
            generation, draw(k0, (population, length)), jax.random.split(k_gen, generations)
        )
        scores = fitness(pop)
        best = jnp.argmin(scores)
        return pop[best], jnp.concatenate([history, scores[best][None]])

    return run(key)

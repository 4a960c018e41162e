r"""Cost of the attacks on the shipped test bed: attack iterations/s, compile time, achieved
FLOP/s, and time to first success.

    python -m benchmarks.attacks [--prompts=8] [--steps=40] [--model=FOLDER] [--concept=red]

* UnlearnDiffAtk: one timestep's ``--steps`` Adam steps (``unlearndiffatk.make_attack_steps``)
  for ``--prompts`` prompts at once (vmapped, one compiled program), k = 3 tokens;
* P4D: ``--steps`` steps of P4D-N (n = 8) for ``--prompts`` prompts, the original and the
  attacked model both the shipped one (speed does not depend on the weights);
* Ring-A-Bell: 100 generations of population 200 for one prompt (K = 8);
* time to first success: UnlearnDiffAtk's whole protocol (``configs/attacks/
  unlearndiffatk.py:testbed``, judge after each timestep) on ``--model`` (default: the shipped
  model, where most prompts succeed before any attack) for ``--prompts`` prompts of
  ``--concept``: wall-clock seconds until each successful prompt's success.

Iterations/s count prompt-steps (one prompt, one optimiser step); FLOP/s is XLA's cost
analysis of the program (a loop body counted once, so it is multiplied by the trip count)
over its time, against the measured matmul peak.
"""

from absl import app, flags

_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts attacked at once.")
_STEPS = flags.DEFINE_integer("steps", 40, "Optimiser steps per timed call.")
_MODEL = flags.DEFINE_string("model", "", "Model for the time-to-first-success run.")
_CONCEPT = flags.DEFINE_string("concept", "red", "Concept of the time-to-first-success run.")
_CALLS = flags.DEFINE_integer("calls", 2, "Timed calls (after one warm-up).")


def main(argv):
    del argv
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.common import compile_timed, machine, matmul_peak_flops, model_flops, time_calls
    from configs.attacks import unlearndiffatk as uda_config
    from jaxsafe.attacks import judges, p4d, ring_a_bell, run, tokens, unlearndiffatk
    from jaxsafe.data import shapes_metrics
    from jaxsafe.diffusion import pipeline

    pipe = pipeline.load()
    b, steps = _PROMPTS.value, _STEPS.value
    graphdef, state, eps, encode, vocab, table = run._white_box(pipe)
    prompts, _ = shapes_metrics.concept_prompts(_CONCEPT.value, b, seed=100)
    words = tokens.token_embeddings(pipe.model.text_encoder, jnp.asarray(pipe.tokenize(prompts)))
    x0 = jax.random.normal(jax.random.key(0), (b, 1) + pipe.latent_shape)
    keys = jax.random.split(jax.random.key(1), b)
    peak = matmul_peak_flops()
    print(f"machine: {machine()}; matmul peak {peak / 1e9:.1f} GFLOP/s")

    def report(name, fn, args, iters):
        compiled, t_c = compile_timed(jax.jit(fn), *args)
        sec = time_calls(lambda: compiled(*args), _CALLS.value)
        flops = model_flops(jax.jit(fn).lower, *args) * iters[1]
        print(
            f"{name:15s} compile {t_c:6.1f} s  {sec:7.3f} s/call  {iters[0] / sec:8.1f} "
            f"iterations/s  {flops / sec / 1e9:7.2f} GFLOP/s ({flops / sec / peak * 100:.1f} % "
            "of peak)"
        )

    u = jnp.broadcast_to(tokens.uniform_simplex(3, len(vocab)), (b, 3, len(vocab)))
    uda = unlearndiffatk.make_attack_steps(eps, encode, table, pipe.scheduler, steps=steps)
    report(
        "UnlearnDiffAtk",
        jax.vmap(uda, in_axes=(None, 0, 0, 0, None, 0)),
        (state, u, words[:, None], x0, 500, keys),
        (b * steps, steps),
    )

    index, m = p4d.layout(
        "n", 7, n=8, length=pipe.model.text_encoder.config.max_position_embeddings
    )
    attack = p4d.make_attack(eps, eps, encode, table, pipe.scheduler, steps=steps)
    target = pipe.embed(prompts)
    p0 = table[jax.random.randint(jax.random.key(2), (b, m), 0, len(vocab))]
    report(
        "P4D-N",
        jax.vmap(lambda p, w, te, x, k: attack(state, p, w[None], 7, index, te[None], x, k)),
        (p0, words, target, x0, keys),
        (b * steps, steps),
    )

    tok = pipe.tokenizer
    fitness = ring_a_bell.sequence_fitness(
        lambda ids: pipe.model.encode(ids),
        target[0],
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=tok.pad_token_id,
        length=target.shape[1],
    )
    search = jax.jit(
        lambda key: ring_a_bell.genetic_search(
            fitness, key, vocab_ids=vocab, length=8, population=200, generations=100
        )[1]
    )
    compiled, t_c = compile_timed(search, jax.random.key(3))
    sec = time_calls(lambda: compiled(jax.random.key(4)), _CALLS.value)
    print(
        f"{'Ring-A-Bell':15s} compile {t_c:6.1f} s  {sec:7.3f} s/call  "
        f"{100 / sec:8.1f} generations/s  {100 * 200 / sec:8.0f} candidates/s"
    )

    target_pipe = pipeline.load(_MODEL.value or None)
    c = uda_config.get_config("testbed")
    g, *st = nnx.split(pipe.model)
    seeds = np.arange(b)
    images = pipeline.generator(pipe, g, **dict(c.sampling))(st, prompts, seeds)
    run.unlearndiffatk_run(
        target_pipe,
        prompts,
        seeds,
        images,
        judges.oracle_judge(_CONCEPT.value),
        k=c.k,
        steps_per_t=c.steps_per_t,
        num_t=1,
        sampling=dict(c.sampling),
    )  # compiles
    t0 = time.perf_counter()
    out = run.unlearndiffatk_run(
        target_pipe,
        prompts,
        seeds,
        images,
        judges.oracle_judge(_CONCEPT.value),
        k=c.k,
        steps_per_t=c.steps_per_t,
        num_t=c.num_t,
        sampling=dict(c.sampling),
    )
    wall = time.perf_counter() - t0
    rounds = c.num_t if not out["success"].all() else int(out["first_t"].max()) + 1
    per_round = wall / max(rounds, 1)
    attacked = out["success"] & ~out["pre"]
    firsts = (out["first_t"][attacked] + 1) * per_round
    print(
        f"time to first success on {target_pipe.folder}: {b} prompts, pre-attack "
        f"{int(out['pre'].sum())}, attack successes {int(attacked.sum())}, whole protocol "
        f"{wall:.1f} s ({rounds} timestep rounds of {c.steps_per_t} steps + judge, "
        f"{per_round:.2f} s each); first success after "
        + (f"{firsts.mean():.1f} s on average" if len(firsts) else "– (none)")
    )


if __name__ == "__main__":
    app.run(main)

r"""Cost of concept erasure: closed-form edits at SD scale and ESD training steps.

    python -m benchmarks.erasure --what=edit          # UCE (and RECE), SD 1.4's 16 attn2 layers
    python -m benchmarks.erasure --what=esd_testbed   # ESD-u / ESD-x steps/s, shipped test bed
    python -m benchmarks.erasure --what=esd_sd15      # ESD-x step, SD 1.5 UNet (random weights)
    python -m benchmarks.erasure --what=edit,esd_sd15 --reference   # + the authors' PyTorch arms

* edit: SD 1.4's 32 cross-attention key/value matrices (random N(0, 0.02²)), one erased prompt's
  76 token rows mapped onto the guide's, ``--preserve`` prompts of 76 rows each: compile time,
  seconds per edit, XLA cost-analysis FLOPs; RECE: one round (adversarial embedding + UCE edit).
* esd_testbed: the trainer's compiled step of ``configs/erasure/esd.py:cpu`` (ESD-u) and
  ``:x_cpu`` (ESD-x) on the shipped test-bed model, K steps per call (``--k``), the mean over
  ``--steps`` steps (a step's cost varies with the number n of partial-sampling DDIM steps).
* esd_sd15: the update (three frozen UNet calls and the trained UNet's forward and backward on
  ESD-x's parameters, Adam) at n = 0, and one guided DDIM step (UNet on batch 2); a full step is
  update + n × guided step, E[n] = (N − 1)/2 = 24.5 for N = 50. Batch 1, 64×64×4 latents.

``--reference`` times the authors' UCE edit and ESD-x update written in PyTorch
(``benchmarks/reference/erasure.py``) in turn with jaxsafe's (A B A B) and prints the ratio
(> 1: jaxsafe faster).
"""

from absl import app, flags

_WHAT = flags.DEFINE_list("what", ["edit", "esd_testbed"], "edit, esd_testbed, esd_sd15")
_PRESERVE = flags.DEFINE_integer("preserve", 20, "Preserved prompts in the UCE/RECE edit.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed ESD steps on the test bed.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed calls of the other programs.")
_K = flags.DEFINE_list("k", ["1", "8"], "esd_testbed: steps per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum(
    "lowering",
    "auto",
    ["auto", "scan", "loop"],
    "How K > 1 steps run (jaxsafe.train.loop.lowering).",
)
_REFERENCE = flags.DEFINE_bool(
    "reference",
    False,
    "Also time the authors' PyTorch UCE edit and "
    "ESD-x update (benchmarks/reference/erasure.py) in turn with "
    "jaxsafe's, and print the ratio.",
)

SD14_XATTN_WIDTHS = (
    320,
    320,
    640,
    640,
    1280,
    1280,
    1280,
    1280,
    1280,
    1280,
    640,
    640,
    640,
    320,
    320,
    320,
)  # down (2 per level), mid, up (3 per level): 16 layers


def bench_edit(peak):
    import jax
    import numpy as np

    from benchmarks.common import compile_timed, fmt_bytes, memory_bytes, model_flops, time_calls
    from jaxsafe.erasure import closed_form

    r = np.random.default_rng(0)
    ks = {
        f"l{i}/attn2/to_{kv}/kernel": (0.02 * r.standard_normal((768, w))).astype(np.float32)
        for i, w in enumerate(SD14_XATTN_WIDTHS)
        for kv in "kv"
    }
    c_e, c_g = r.standard_normal((2, 76, 768)).astype(np.float32)
    c_p = (
        r.standard_normal((76 * _PRESERVE.value, 768)).astype(np.float32)
        if _PRESERVE.value
        else None
    )
    uce = jax.jit(lambda k, e, g, p: closed_form.uce_edit(k, e, g, p, lam=0.5))
    compiled, comp_s = compile_timed(uce, ks, c_e, c_g, c_p)
    sec = time_calls(lambda: compiled(ks, c_e, c_g, c_p), _REPS.value)
    flops = model_flops(uce.lower, ks, c_e, c_g, c_p)
    print(
        f"UCE edit, SD 1.4 cross-attention (16 layers, 32 K/V matrices, 76 erase rows, "
        f"{_PRESERVE.value} preserved prompts): compile {comp_s:.2f} s, {sec * 1e3:.1f} ms/edit, "
        f"{flops / 1e9:.2f} GFLOP, {flops / sec / 1e9:.1f} GFLOP/s "
        f"({100 * flops / sec / peak:.1f} % of matmul peak), peak memory "
        f"{fmt_bytes(memory_bytes(compiled))}"
    )
    if _REFERENCE.value:
        from benchmarks.reference import erasure as reference

        _vs_reference(
            "UCE edit",
            lambda: compiled(ks, c_e, c_g, c_p),
            lambda: reference.uce_edit(ks, c_e, c_g, c_p, lam=0.5),
            "ms",
            1e3,
        )
    try:
        from jaxsafe.erasure import rece
    except ImportError:
        return
    rnd = jax.jit(lambda k, k0, e, g, p: rece.rece_round(k, k0, e, g, p, lam_emb=0.1, lam=0.1))
    compiled, comp_s = compile_timed(rnd, ks, ks, c_e, c_g, c_p)
    sec = time_calls(lambda: compiled(ks, ks, c_e, c_g, c_p), _REPS.value)
    flops = model_flops(rnd.lower, ks, ks, c_e, c_g, c_p)
    print(
        f"RECE round (adversarial embedding over 32 matrices + UCE edit): compile {comp_s:.2f} s, "
        f"{sec * 1e3:.1f} ms/round, {flops / 1e9:.2f} GFLOP, {flops / sec / 1e9:.1f} GFLOP/s "
        f"({100 * flops / sec / peak:.1f} % of matmul peak)"
    )


def _vs_reference(what, ours, theirs, unit="s", scale=1.0):
    """Times jaxsafe's and the PyTorch reference's call in turn (A B A B) and prints the ratio."""
    import numpy as np

    from benchmarks.common import alternate
    from benchmarks.reference import torch_threads

    threads = torch_threads()
    sec = alternate({"jaxsafe": (ours, _REPS.value), "reference": (theirs, _REPS.value)}, rounds=3)
    a, r = float(np.median(sec["jaxsafe"])), float(np.median(sec["reference"]))
    print(
        f"  {what}, timed in turn: jaxsafe {a * scale:.1f} {unit}  PyTorch ({threads} threads) "
        f"{r * scale:.1f} {unit}  {r / a:.2f}x the reference"
    )


def bench_esd_testbed(peak):
    import jax
    import numpy as np

    from benchmarks.common import alternate, k_step_arms
    from configs.erasure import esd as esd_config
    from experiments import erase_esd
    from jaxsafe import parallel
    from jaxsafe.train import init_state, place_state

    mesh = parallel.make_mesh(-1, 1)
    ks = list(map(int, _K.value))
    for arg in ("cpu", "x_cpu"):
        c = esd_config.get_config(arg)
        task = erase_esd.build(c, mesh)
        state = place_state(
            init_state(task.params, task.frozen, task.optimizer, task.extra),
            mesh,
            (),
            c.train.fsdp_min_size,
        )
        batch = parallel.global_batch(task.train_data, mesh)
        arms, rows, flops = k_step_arms(
            task, state, lambda k: batch, mesh, ks, _LOWERING.value, _STEPS.value
        )
        seconds = alternate(arms, rounds=1 if len(arms) == 1 else 3)
        n_train = sum(x.size for x in jax.tree.leaves(task.params))
        for k, (comp_s, memory) in rows.items():
            sec = float(np.median(seconds[k])) / k
            print(
                f"ESD ({c.esd.train_method}) on the test bed  K={k:<2d}: {n_train:,} trained "
                f"parameters, compile {comp_s:.1f} s, {1 / sec:.2f} steps/s (mean of "
                f"{max(1, _STEPS.value // k) * k}, N = {c.esd.ddim_steps} partial DDIM steps), "
                f"{c.train.num_steps} steps = {c.train.num_steps * sec:.0f} s, peak memory "
                f"{memory}, {flops / 1e9:.2f} GFLOP/step outside the sampling loop"
            )


def bench_esd_sd15(peak):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks.common import (
        compile_timed,
        fmt_bytes,
        memory_bytes,
        model_flops,
        random_model,
        time_calls,
    )
    from jaxsafe.diffusion import schedulers
    from jaxsafe.diffusion.t2i import classifier_free_guidance
    from jaxsafe.erasure import esd
    from jaxsafe.erasure import params as ep
    from jaxsafe.nn.unet2d_condition import UNet2DConditionModel, sd15_unet_config

    cfg = sd15_unet_config()
    graphdef, params, n = random_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    model = nnx.merge(graphdef, params)
    graphdef, train, rest = nnx.split(model, ep.nnx_filter(ep.selection("xattn", "")), ...)
    orig = jax.tree.map(jnp.copy, train)
    sched = schedulers.SchedulerConfig()
    loss_fn = esd.make_esd_loss(
        lambda p, f, x, t, e: nnx.merge(graphdef, p, f[1])(x, t, e),
        lambda f, x, t, e: nnx.merge(graphdef, f[0], f[1])(x, t, e),
        sched,
        num_inference_steps=1,
        latent_shape=(64, 64, 4),
    )  # N = 1: n = 0, no sampling
    tx = optax.adam(1e-5)
    emb = jax.random.normal(jax.random.key(1), (3, 1, 77, 768))
    batch = {"c_e": emb[0], "uncond": emb[2]}  # ESD's guide: the empty prompt

    def update(p, o, f):
        loss, g = jax.value_and_grad(lambda q: loss_fn(q, f, {}, batch, jax.random.key(0))[0])(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    opt = tx.init(train)
    frozen = (orig, rest)
    compiled, comp_s = compile_timed(jax.jit(update), train, opt, frozen)
    sec = time_calls(lambda: compiled(train, opt, frozen), _REPS.value)
    flops = model_flops(jax.jit(update).lower, train, opt, frozen)
    n_train = sum(x.size for x in jax.tree.leaves(train))
    print(
        f"ESD-x update on the SD 1.5 UNet ({n / 1e6:.1f} M parameters, {n_train / 1e6:.2f} M "
        f"trained): compile {comp_s:.1f} s, {sec:.2f} s/update, {flops / 1e9:.0f} GFLOP, "
        f"{flops / sec / 1e9:.1f} GFLOP/s ({100 * flops / sec / peak:.1f} % of matmul peak), "
        f"peak memory {fmt_bytes(memory_bytes(compiled))}"
    )
    if _REFERENCE.value:
        from benchmarks.reference import erasure as reference

        theirs, _ = reference.make_esd_x_update(cfg, (64, 64, 4), (77, 768))
        _vs_reference("ESD-x update", lambda: compiled(train, opt, frozen), theirs)

    def guided(p, x, e):
        out = nnx.merge(graphdef, p, rest)(
            jnp.concatenate([x, x]), jnp.full((2,), 500), jnp.concatenate([e[2], e[0]])
        )
        return classifier_free_guidance(out[:1], out[1:], 3.0)

    x = jax.random.normal(jax.random.key(2), (1, 64, 64, 4))
    g_comp, g_s = compile_timed(jax.jit(guided), train, x, emb)
    g_sec = time_calls(lambda: g_comp(train, x, emb), _REPS.value)
    full = sec + 24.5 * g_sec
    print(
        f"  guided DDIM step of the partial sampling (UNet batch 2): compile {g_s:.1f} s, "
        f"{g_sec:.2f} s/step; a full ESD step at E[n] = 24.5: {full:.1f} s "
        f"({1 / full:.4f} steps/s; 1000 iterations = {1000 * full / 3600:.1f} h)"
    )


def main(argv):
    del argv
    from benchmarks.common import machine, matmul_peak_flops

    peak = matmul_peak_flops()
    print(f"machine: {machine()}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    for what in _WHAT.value:
        {"edit": bench_edit, "esd_testbed": bench_esd_testbed, "esd_sd15": bench_esd_sd15}[what](
            peak
        )


if __name__ == "__main__":
    app.run(main)

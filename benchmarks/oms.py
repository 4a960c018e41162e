r"""Cost of One More Step relative to the whole compiled base sampling run it precedes.

    python -m benchmarks.oms [--batch=32] [--steps=25] [--oms_guidance=2.0] [--calls=3]

On the shipped test bed (``jaxsafe/diffusion/pipeline.load()``): the base run is the test bed's
guided DDIM sampler (``--steps`` steps, guidance 4, one compiled program with the decoder); the
OMS step is ``oms.initial_latents`` with an OMS network of the base UNet's own architecture
without its time path (random weights: speed does not depend on them) and the base text encoder,
guided (two network evaluations) unless ``--oms_guidance=1``. Prints compile times, seconds per
call, images/s, XLA's FLOPs per call (a loop body counted once) and the OMS share of a whole
OMS + base run. The published OMS modules are smaller than their base UNets (OMS-b about 154 M
parameters, from its file size, against SD 2.1's 866 M), so this same-architecture ratio is an
upper bound.
"""

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch", 32, "Images per call.")
_STEPS = flags.DEFINE_integer("steps", 25, "Base sampler steps.")
_GUIDANCE = flags.DEFINE_float("oms_guidance", 2.0, "OMS guidance scale (1: one evaluation).")
_CALLS = flags.DEFINE_integer("calls", 3, "Timed calls (after one warm-up).")


def main(argv):
    del argv
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.common import compile_timed, machine, model_flops, time_calls
    from jaxsafe.diffusion import oms, pipeline, t2i
    from jaxsafe.nn.unet2d_condition import UNet2DConditionModel

    pipe = pipeline.load()
    b, shape = _BATCH.value, pipe.latent_shape
    ucfg = dataclasses.replace(pipe.model.unet.config, time_conditioning=False)
    oms_unet = UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(pipe.model)
    o_graphdef, o_state = nnx.split(oms_unet)
    emb = pipe.embed(["a red square on a plain background"] * b)
    uncond = pipe.embed([""])
    seeds = jnp.arange(b, dtype=jnp.int32)
    a0 = oms.first_alpha_bar(pipe.scheduler, "ddim", _STEPS.value)

    base = t2i.make_t2i_sampler(
        lambda s, x, t, e: nnx.merge(graphdef, s)(x, t, e),
        pipe.scheduler,
        num_inference_steps=_STEPS.value,
        guidance_scale=4.0,
        latent_shape=shape,
        decode=lambda _, z: pipe.decode(z),
    )

    @jax.jit
    def step(o_state, emb, uncond, seeds):
        return oms.initial_latents(
            lambda s, x, e: nnx.merge(o_graphdef, s)(x, None, e),
            o_state,
            emb,
            uncond,
            seeds,
            latent_shape=shape,
            alpha_bar_tau0=a0,
            guidance_scale=_GUIDANCE.value,
        )

    c_oms, t_co = compile_timed(step, o_state, emb, uncond, seeds)
    x0 = c_oms(o_state, emb, uncond, seeds)
    c_base, t_cb = compile_timed(base, state, emb, uncond, seeds, x0)
    f_oms = model_flops(step.lower, o_state, emb, uncond, seeds)
    f_base = model_flops(base.lower, state, emb, uncond, seeds, x0)
    s_base = time_calls(lambda: c_base(state, emb, uncond, seeds, x0), _CALLS.value)
    s_oms = time_calls(lambda: c_oms(o_state, emb, uncond, seeds), _CALLS.value)
    print(f"machine: {machine()}")
    print(
        f"test bed latent {shape}, batch {b}, base DDIM {_STEPS.value} steps guided "
        f"(NFE {2 * _STEPS.value}), OMS guidance {_GUIDANCE.value}, ᾱ_τ0 = {a0:.4f}"
    )
    for name, flops, sec, t_c in (
        ("base run", f_base, s_base, t_cb),
        ("OMS step", f_oms, s_oms, t_co),
    ):
        print(
            f"{name:9s} compile {t_c:6.1f} s  {sec * 1e3:8.1f} ms/call  {b / sec:8.1f} images/s"
            f"  {flops / 1e9:8.3f} GFLOP/call"
        )
    print(
        f"OMS share of an OMS + base run: {s_oms / (s_oms + s_base) * 100:.1f} % of the time "
        "(the base run's GFLOP/call counts its loop body once: XLA's cost analysis)"
    )


if __name__ == "__main__":
    app.run(main)

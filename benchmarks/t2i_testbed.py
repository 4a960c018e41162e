r"""Cost of the text-to-image test bed: training steps and guided DDIM sampling.

    python -m benchmarks.t2i_testbed [--config=configs/t2i/testbed.py:cpu] [--steps=20] \
        [--k=1,8] [--lowering=auto] [--pixel_space]

Prints, for the test bed's train step (the trainer's compiled program, K steps per call, one row
per ``--k``, the K's timed in turn):
compile time, steps/s and images/s, achieved FLOP/s (XLA cost analysis × steps/s) against the
measured f32 matmul peak, XLA's planned peak memory; for the sampler (DDIM, classifier-free
guidance, ``sampling.num_inference_steps`` steps, ``sampling.batch_size`` images per call):
compile time and images/s. ``--pixel_space`` also times one training step of the rejected
alternative, a UNet on the 32×32×3 pixels with widths (32, 64, 64) (no cross-attention at 32×32),
to document why the test bed diffuses 4×4-unshuffled pixels (experiments/t2i_testbed.py).
"""

import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/t2i/testbed.py:cpu", "Test-bed config[:arg].")
_STEPS = flags.DEFINE_integer("steps", 20, "Train steps timed.")
_SAMPLE_CALLS = flags.DEFINE_integer("sample_calls", 2, "Sampler calls timed.")
_PIXEL = flags.DEFINE_bool("pixel_space", False, "Also time a pixel-space UNet step.")
_K = flags.DEFINE_list("k", ["1", "8"], "Train steps per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum(
    "lowering",
    "auto",
    ["auto", "scan", "loop"],
    "How K > 1 steps run (jaxsafe.train.loop.lowering).",
)


def pixel_space_step(config, peak):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.common import compile_timed, model_flops, time_calls
    from experiments import t2i_testbed as tb
    from jaxsafe.data import shapes
    from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel

    tok = shapes.tokenizer(config.data.max_length)
    te = tb.CLIPTextModel(tb.text_config(config, tok), rngs=nnx.Rngs(0))
    unet = UNet2DConditionModel(
        UNet2DConditionConfig(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=config.text_encoder.hidden_size,
            attention_head_dim=4,
            norm_num_groups=8,
            use_linear_projection=True,
        ),
        rngs=nnx.Rngs(1),
    )
    graphdef, params = nnx.split((te, unet), nnx.Param)
    b = config.train.batch_size

    def loss(p, x, t, ids):
        te, unet = nnx.merge(graphdef, p)
        return jnp.mean((unet(x, t, te(ids)["last_hidden_state"]) - x) ** 2)

    x, t = jnp.zeros((b, 32, 32, 3)), jnp.arange(b)
    ids = jnp.asarray(tok(["a red circle"] * b))
    step = jax.jit(jax.value_and_grad(loss))
    compiled, compile_s = compile_timed(step, params, x, t, ids)
    sec = time_calls(lambda: compiled(params, x, t, ids), 3)
    flops = model_flops(step.lower, params, x, t, ids)
    print(
        f"pixel-space UNet (32x32x3, widths 32/64/64), batch {b}: compile {compile_s:.1f} s, "
        f"{1 / sec:.3f} steps/s ({sec:.2f} s/step), {flops / sec / 1e9:.2f} GFLOP/s "
        f"({100 * flops / sec / peak:.1f} % of matmul peak), {flops / 1e9:.1f} GFLOP/step"
    )


def main(argv):
    del argv
    import jax
    import numpy as np

    from benchmarks.common import (
        alternate,
        k_step_arms,
        load_config,
        machine,
        matmul_peak_flops,
        stacked_batch,
        time_calls,
    )
    from experiments import t2i_testbed as tb
    from jaxsafe import parallel, train

    config = load_config(_CONFIG.value)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    peak = matmul_peak_flops()
    print(f"machine: {machine()}")
    print(f"config: {_CONFIG.value}  batch {config.train.batch_size}  mesh {dict(mesh.shape)}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    task = tb.build(config, mesh)
    tc = config.train
    n_params = sum(x.size for x in jax.tree.leaves(task.params))
    print(f"trainable parameters: {n_params:,}")
    state = train.place_state(
        train.init_state(task.params, task.frozen, task.optimizer, task.extra, tc.seed),
        mesh,
        task.sharding_rules,
        tc.fsdp_min_size,
    )
    ks = list(map(int, _K.value))
    arms, rows, flops = k_step_arms(
        task,
        state,
        lambda k: stacked_batch(task.train_data, k, mesh),
        mesh,
        ks,
        _LOWERING.value,
        _STEPS.value,
        fixed_batch=False,
    )
    seconds = alternate(arms, rounds=1 if len(arms) == 1 else 3)
    for k, (compile_s, memory) in rows.items():
        sec = float(np.median(seconds[k])) / k
        print(
            f"train step K={k:<2d}: compile {compile_s:.1f} s, {1 / sec:.3f} steps/s, "
            f"{config.train.batch_size / sec:.1f} images/s, {flops / sec / 1e9:.2f} GFLOP/s "
            f"({100 * flops / sec / peak:.1f} % of matmul peak), {flops / 1e9:.2f} GFLOP/step, "
            f"peak memory {memory}"
        )
    box = [jax.tree.map(lambda x: x.copy(), state)]

    tok = tb.shapes.tokenizer(config.data.max_length)
    generate = tb.make_generator(task.graphdef, config, tok)
    s = config.sampling
    captions = ["a red circle on a plain background"] * s.batch_size
    seeds = np.arange(s.batch_size)
    t0 = time.perf_counter()
    generate((box[0].extra["ema"], box[0].frozen), captions, seeds)
    first = time.perf_counter() - t0
    sec = time_calls(
        lambda: generate((box[0].extra["ema"], box[0].frozen), captions, seeds), _SAMPLE_CALLS.value
    )
    print(
        f"sampling (DDIM {s.num_inference_steps} steps, guidance {s.guidance_scale}, batch "
        f"{s.batch_size}): first call (compile + run) {first:.1f} s, "
        f"{s.batch_size / sec:.2f} images/s"
    )
    if _PIXEL.value:
        pixel_space_step(config, peak)


if __name__ == "__main__":
    app.run(main)

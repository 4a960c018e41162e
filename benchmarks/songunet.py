r"""Throughput of EDM's SongUNet (jaxsafe.nn.songunet): inference forward and a training step.

    python -m benchmarks.songunet [--arch=ddpmpp_cifar10] [--batch=8] [--dtype=float32]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.songunet --mesh_fsdp=8

"forward" is ``F_theta(x; c_noise)`` in eval mode; "train" is one jitted step of an EDM-style
denoising loss ``|| F_theta(x + sigma n; c_noise) - n ||^2`` (dropout on, keys from the step)
with ``jax.value_and_grad`` and an Adam update, parameters and optimizer state donated.
Parameters are placed with ``SONGUNET_SHARDING_RULES`` on a ``(data, fsdp)`` mesh and the batch
is split over both axes. Prints compile time, samples/s, XLA cost-analysis FLOPs per call
(summed over devices) as achieved FLOP/s against a measured matmul peak in the same dtype, and
XLA's planned peak memory per device.
"""

import time

from absl import app, flags

_ARCH = flags.DEFINE_enum(
    "arch",
    "ddpmpp_cifar10",
    ["ddpmpp_cifar10", "ncsnpp_cifar10", "ddpmpp_ffhq64", "ncsnpp_ffhq64"],
    "Preset of jaxsafe.nn.songunet.",
)
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_LABEL_DIM = flags.DEFINE_integer("label_dim", 0, "Classes (0: unconditional).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Trunk compute dtype.")
_MODES = flags.DEFINE_list("modes", ["forward", "train"], "Which programs to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per program (after one warm-up).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Size of the mesh's data axis (-1: the rest).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Size of the mesh's fsdp axis.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from benchmarks.common import (
        compile_timed,
        fmt_bytes,
        machine,
        matmul_peak_flops,
        memory_bytes,
        model_flops,
        time_calls,
    )
    from jaxsafe import parallel
    from jaxsafe.nn import songunet

    unknown = sorted(set(_MODES.value) - {"forward", "train"})
    if unknown:
        raise ValueError(f"--modes: expected 'forward' and/or 'train', got {unknown}")
    dtype = jnp.dtype(_DTYPE.value)
    mesh = parallel.make_mesh(_MESH_DATA.value, _MESH_FSDP.value)
    peak = matmul_peak_flops(dtype=dtype)
    t0 = time.perf_counter()
    model = getattr(songunet, _ARCH.value)(
        label_dim=_LABEL_DIM.value, dtype=dtype, rngs=nnx.Rngs(0)
    )
    init_s = time.perf_counter() - t0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    place = lambda tree: jax.device_put(
        tree, parallel.shardings_for(tree, mesh, songunet.SONGUNET_SHARDING_RULES)
    )
    params, rest = place(params), place(rest)

    r, c, b = model.img_resolution, model.in_channels, _BATCH.value
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.standard_normal((b, r, r, c)).astype(np.float32),
        "sigma": np.exp(rng.normal(-1.2, 1.2, b)).astype(np.float32),
        "augment": np.zeros((b, model.augment_dim), np.float32),
    }
    if _LABEL_DIM.value:
        batch["labels"] = np.eye(_LABEL_DIM.value, dtype=np.float32)[
            rng.integers(_LABEL_DIM.value, size=b)
        ]
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))

    print(f"machine: {machine()}")
    print(
        f"{_ARCH.value}: {n_params:,} parameters, label_dim={_LABEL_DIM.value}, batch {b}, "
        f"{r}x{r}, compute {dtype.name}, mesh {dict(mesh.shape)}, init {init_s:.1f} s"
    )
    print(f"measured {dtype.name} matmul peak: {peak / 1e9:.1f} GFLOP/s")

    def denoiser_call(model, batch, key=None):
        x, sigma = batch["x"], batch["sigma"]
        return model(
            x,
            jnp.log(sigma) / 4,
            batch.get("labels"),
            batch["augment"],
            rngs=None if key is None else nnx.Rngs(dropout=key),
        )

    def forward(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return denoiser_call(model, batch)

    optimizer = optax.adam(1e-4)

    def train_step(params, opt_state, rest, batch, step):
        key = jax.random.fold_in(jax.random.key(0), step)

        def loss_fn(params):
            n = jax.random.normal(jax.random.fold_in(key, 1), batch["x"].shape)
            noisy = dict(batch, x=batch["x"] + batch["sigma"][:, None, None, None] * n)
            f = denoiser_call(nnx.merge(graphdef, params, rest), noisy, jax.random.fold_in(key, 2))
            return jnp.mean(jnp.square(f.astype(jnp.float32) - n))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def forward_program():
        return jax.jit(forward), (params, rest, batch), lambda c: lambda: c(params, rest, batch)

    def train_program():
        opt_state = place(optimizer.init(params))  # moments named '0/mu/<param name>'
        # Explicit out_shardings: left to propagation, XLA may split a replicated bias.
        sharding_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        jitted = jax.jit(
            train_step,
            donate_argnums=(0, 1),
            out_shardings=(sharding_of(params), sharding_of(opt_state), parallel.replicated(mesh)),
        )

        def make_call(compiled):
            box = [jax.tree.map(jnp.copy, params), opt_state, 0]  # donated, so not `params`

            def call():
                box[0], box[1], loss = compiled(box[0], box[1], rest, batch, box[2])
                box[2] += 1
                return loss

            return call

        return jitted, (params, opt_state, rest, batch, 0), make_call

    programs = {"forward": forward_program, "train": train_program}
    for mode in _MODES.value:
        jitted, args, make_call = programs[mode]()
        compiled, compile_s = compile_timed(jitted, *args)
        flops = model_flops(jitted.lower, *args)  # before the calls donate the arguments
        sec = time_calls(make_call(compiled), _STEPS.value)
        achieved = flops / sec
        print(
            f"{mode:8s} compile {compile_s:6.1f} s  {b / sec:8.2f} samples/s  "
            f"{flops / 1e9:8.1f} GFLOP/call  {achieved / 1e9:7.1f} GFLOP/s "
            f"({100 * achieved / peak:5.1f} % of matmul peak)  "
            f"peak memory {fmt_bytes(memory_bytes(compiled))}"
        )


if __name__ == "__main__":
    app.run(main)

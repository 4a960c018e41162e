r"""SiD / SFD distillation and one-step sampling throughput against the teacher's Heun sampler.

    python -m benchmarks.sid [--teacher=configs/pfgmpp/cifar10_cond_edm.py] [--variant=cpu] \
        [--batch=64] [--sample_batch=256] [--steps=3] [--forget] [--k=1,8] [--lowering=auto]

The teacher architecture of ``--teacher:--variant`` at random initialisation (speed does not
depend on the weights). Distillation: one iteration of ``jaxsafe.diffusion.sid.make_sid_step``
(f_ψ update then G update, EMA), with SFD's two batches under ``--forget``, jitted by the
trainer's ``compile_train_step`` with K iterations per call (``--k``, one row each, the K's timed
in turn): compile time, iterations/s, generated images/s, XLA's planned
peak memory, achieved FLOP/s (cost analysis × iterations/s) against the measured f32 matmul peak.
Sampling: the one-step generator against the teacher's ``sampler.num_steps``-step Heun sampler
(NFE 2N − 1), images/s of both at ``--sample_batch``.
"""

from absl import app, flags

_TEACHER = flags.DEFINE_string(
    "teacher", "configs/pfgmpp/cifar10_cond_edm.py", "configs/pfgmpp teacher config file."
)
_VARIANT = flags.DEFINE_string("variant", "cpu", "Teacher config argument (paper / cpu / smoke).")
_BATCH = flags.DEFINE_integer("batch", 64, "Distillation batch size (per term).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 256, "Sampling batch size (0 = skip).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls per measurement (after one warm-up).")
_FORGET = flags.DEFINE_bool("forget", False, "SFD: forget class 0 (override 1).")
_K = flags.DEFINE_list("k", ["1", "8"], "Iterations per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum(
    "lowering",
    "auto",
    ["auto", "scan", "loop"],
    "How K > 1 iterations run (jaxsafe.train.loop.lowering).",
)


def main(argv):
    del argv
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks.common import (
        alternate,
        k_step_arms,
        load_config,
        machine,
        matmul_peak_flops,
        time_calls,
    )
    from experiments import sid as sid_exp
    from jaxsafe import parallel, train
    from jaxsafe.diffusion import edm, sfd, sid
    from jaxsafe.diffusion import image_model as im

    tc = load_config(f"{_TEACHER.value}:{_VARIANT.value}")
    mesh = parallel.make_mesh()
    peak = matmul_peak_flops()
    graphdef, params, rest = train.split_model(im.build_model(tc))
    shape = im.image_shape(tc.data)
    classes = im.num_classes(tc)
    b = _BATCH.value
    print(f"machine: {machine()}")
    print(
        f"teacher: {_TEACHER.value}:{_VARIANT.value}  image {shape}  classes {classes}  "
        f"params {sum(x.size for x in jax.tree.leaves(params)):,}"
    )
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    denoise = sid_exp.make_denoise(graphdef, rest, tc)
    tx = optax.adam(1e-5, b1=0.0, b2=0.999)
    forget = {0: 1} if _FORGET.value else None
    terms = sfd.class_terms(classes, b, forget=forget)
    step = sid.make_sid_step(
        denoise,
        terms,
        g_optimizer=tx,
        psi_optimizer=tx,
        latent_shape=shape,
        batch_size=b,
        kernel=sid.edm_kernel(D=im.augmentation_dim(tc.pfgmpp.D)),
        ema_beta=lambda n: edm.ema_beta(n, b, 500.0, 0.05),
    )
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    task = train.Task(
        graphdef=graphdef,
        params={"G": copy(params), "psi": copy(params)},
        frozen={"teacher": copy(params), "rest": rest},
        optimizer=sid.pair_optimizer(tx, tx),
        train_data={"unused": jnp.zeros(1)},
        extra={"ema": copy(params)},
        step_fn=step,
    )
    state = train.place_state(
        train.init_state(task.params, task.frozen, task.optimizer, task.extra), mesh
    )
    placed = parallel.global_batch(task.train_data, mesh)
    ks = list(map(int, _K.value))
    arms, rows, flops = k_step_arms(
        task, state, lambda k: placed, mesh, ks, _LOWERING.value, _STEPS.value * max(ks)
    )
    seconds = alternate(arms, rounds=1 if len(arms) == 1 else 3)
    n_terms = 2 if forget else 1
    for k, (compile_s, memory) in rows.items():
        sec = float(np.median(seconds[k])) / k  # per iteration
        print(
            f"{'SFD' if forget else 'SiD'} iteration  batch {b} x {n_terms} term(s)  K={k:<2d} "
            f"compile {compile_s:6.1f} s  {1 / sec:7.3f} it/s  {2 * n_terms * b / sec:8.1f} "
            f"generated images/s  {flops / sec / 1e9:7.2f} GFLOP/s "
            f"({100 * flops / sec / peak:5.1f} % of matmul peak)  peak memory {memory}"
        )

    n = _SAMPLE_BATCH.value
    if n:
        labels = jnp.arange(n) % max(classes, 1)
        onehot = jax.nn.one_hot(labels, classes) if classes else None
        one = sid_exp.one_step_sampler(denoise, 2.5, shape)
        t0 = time.perf_counter()
        one_c = one.lower(params, jax.random.key(0), onehot).compile()
        one_compile = time.perf_counter() - t0
        one_s = time_calls(lambda: one_c(params, jax.random.key(0), onehot), _STEPS.value)
        heun = im.make_sample_fn(graphdef, tc)
        t0 = time.perf_counter()
        heun_c = heun.lower(params, rest, jax.random.key(0), labels).compile()
        heun_compile = time.perf_counter() - t0
        heun_s = time_calls(lambda: heun_c(params, rest, jax.random.key(0), labels), _STEPS.value)
        nfe = 2 * tc.sampler.num_steps - 1
        print(
            f"sample batch {n}  one-step: compile {one_compile:5.1f} s  {n / one_s:9.1f} images/s"
            f"  |  teacher {tc.sampler.num_steps} Heun steps (NFE {nfe}): compile "
            f"{heun_compile:5.1f} s  {n / heun_s:8.1f} images/s  |  speed-up "
            f"{heun_s / one_s:6.1f}x"
        )


if __name__ == "__main__":
    app.run(main)
